"""Voice metrics: one file per metric behind `base.Metric`; `base.get(name)` finds one by name."""
