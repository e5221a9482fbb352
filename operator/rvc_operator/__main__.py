"""`python -m rvc_operator`: run the kopf controller.

Watches every namespace, or only RVC_WATCH_NAMESPACE when set. Liveness probe: http://0.0.0.0:<RVC_HEALTH_PORT>
/healthz (kopf's probe server); Prometheus metrics on RVC_METRICS_PORT (/metrics).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, OperatorConfig


def kopf_arguments(cfg: OperatorConfig, namespace: str | None = None) -> dict[str, object]:
    """Keyword arguments for kopf.run (pure; tested)."""
    ns = namespace or cfg.watch_namespace
    return {
        "standalone": True,
        "clusterwide": ns is None,
        "namespaces": [ns] if ns else [],
        "liveness_endpoint": f"http://0.0.0.0:{cfg.health_port}/healthz",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rvc-operator", description="RVCExperiment controller (kopf)")
    ap.add_argument("-n", "--namespace",
                    help="watch only this namespace (default: RVC_WATCH_NAMESPACE, or all)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        cfg = OperatorConfig.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=args.verbose)
    kopf.run(**kopf_arguments(cfg, args.namespace))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
