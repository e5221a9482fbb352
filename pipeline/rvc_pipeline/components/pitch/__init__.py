"""Pitch trackers: one file per method behind `base.PitchMethod`; `base.get(name)` finds one by name."""
