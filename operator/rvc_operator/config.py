"""Operator defaults, read once from environment variables (the Helm chart sets them).

Every variable is documented in docs/operator.md. Bad values raise ConfigError naming the variable,
so a misconfigured operator fails at start instead of building broken Jobs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .ownership import ANY_NAMESPACE, PrefixError, canonical_prefix


class ConfigError(ValueError):
    """An operator environment variable with an invalid value; the message names it."""


DEFAULT_GPU_IMAGE = "rvc-pipeline:latest"
DEFAULT_CPU_IMAGE = "rvc-pipeline-cpu:latest"


@dataclass(frozen=True)
class OperatorConfig:
    pipeline_image: str = DEFAULT_GPU_IMAGE
    cpu_image: str = DEFAULT_CPU_IMAGE
    image_pull_policy: str = "IfNotPresent"
    default_device: str = "gpu"
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: list[dict[str, Any]] = field(default_factory=list)
    cpu_node_selector: dict[str, str] = field(default_factory=dict)
    priority_class: str | None = None
    job_active_deadline_seconds: int = 86400
    job_backoff_limit: int = 3
    job_ttl_seconds: int | None = None
    step_max_retries: int = 2
    retry_backoff_seconds: float = 30.0
    retry_backoff_max_seconds: float = 900.0
    max_concurrent_experiments: int = 0
    pushgateway: str | None = None
    s3_endpoint: str | None = None
    s3_credentials_secret: str | None = None
    service_account: str | None = None
    host_network: bool = False
    metrics_port: int = 8080
    health_port: int = 8081
    run_as_user: int = 1000
    scratch_size_limit: str | None = None
    weights_cache: str | None = None
    delete_artifacts_default: bool = False
    watch_namespace: str | None = None
    reconcile_interval: float = 10.0
    # namespace ("*": any other) -> allowed s3:// prefixes of experiment folders; None: no allow-list
    storage_allowed_prefixes: dict[str, tuple[str, ...]] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        e = os.environ if env is None else env
        r = _Reader(e)
        cfg = cls(
            pipeline_image=r.str("RVC_PIPELINE_IMAGE") or DEFAULT_GPU_IMAGE,
            cpu_image=r.str("RVC_PIPELINE_CPU_IMAGE") or DEFAULT_CPU_IMAGE,
            image_pull_policy=r.choice("RVC_IMAGE_PULL_POLICY", ("IfNotPresent", "Always", "Never"),
                                       "IfNotPresent"),
            default_device=r.choice("RVC_DEFAULT_DEVICE", ("gpu", "cpu"), "gpu"),
            gpu_node_selector=r.json_map("RVC_GPU_NODE_SELECTOR"),
            gpu_tolerations=r.json_list("RVC_GPU_TOLERATIONS"),
            cpu_node_selector=r.json_map("RVC_CPU_NODE_SELECTOR"),
            priority_class=r.str("RVC_PRIORITY_CLASS"),
            job_active_deadline_seconds=r.int("RVC_JOB_ACTIVE_DEADLINE_SECONDS", 86400, minimum=1),
            job_backoff_limit=r.int("RVC_JOB_BACKOFF_LIMIT", 3, minimum=0),
            job_ttl_seconds=r.opt_int("RVC_JOB_TTL_SECONDS", minimum=0),
            step_max_retries=r.int("RVC_STEP_MAX_RETRIES", 2, minimum=0),
            retry_backoff_seconds=r.float("RVC_STEP_RETRY_BACKOFF_SECONDS", 30.0, minimum=0.0),
            retry_backoff_max_seconds=r.float("RVC_STEP_RETRY_BACKOFF_MAX_SECONDS", 900.0, minimum=0.0),
            max_concurrent_experiments=r.int("RVC_MAX_CONCURRENT_EXPERIMENTS", 0, minimum=0),
            pushgateway=r.str("RVC_PUSHGATEWAY"),
            s3_endpoint=r.str("RVC_S3_ENDPOINT"),
            s3_credentials_secret=r.str("RVC_S3_CREDENTIALS_SECRET"),
            service_account=r.str("RVC_SERVICE_ACCOUNT"),
            host_network=r.bool("RVC_HOST_NETWORK", False),
            metrics_port=r.int("RVC_METRICS_PORT", 8080, minimum=0, maximum=65535),
            health_port=r.int("RVC_HEALTH_PORT", 8081, minimum=0, maximum=65535),
            run_as_user=r.int("RVC_RUN_AS_USER", 1000, minimum=1),
            scratch_size_limit=r.str("RVC_SCRATCH_SIZE_LIMIT"),
            weights_cache=r.str("RVC_WEIGHTS_CACHE"),
            delete_artifacts_default=r.bool("RVC_DELETE_ARTIFACTS_DEFAULT", False),
            watch_namespace=r.str("RVC_WATCH_NAMESPACE"),
            reconcile_interval=r.float("RVC_RECONCILE_INTERVAL", 10.0, minimum=1.0),
            storage_allowed_prefixes=r.prefix_table("RVC_STORAGE_ALLOWED_PREFIXES"),
        )
        for i, t in enumerate(cfg.gpu_tolerations):
            if not isinstance(t, dict):
                raise ConfigError(f"RVC_GPU_TOLERATIONS[{i}]: expected a JSON object, got {t!r}")
        return cfg


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def str(self, name: str) -> str | None:
        v = self.env.get(name)
        return v.strip() if v and v.strip() else None

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        v = self.str(name)
        if v is None:
            return default
        for a in allowed:
            if v.lower() == a.lower():
                return a
        raise ConfigError(f"{name}: got {v!r}; allowed values: {list(allowed)}")

    def int(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        v = self.opt_int(name, minimum, maximum)
        return default if v is None else v

    def opt_int(self, name: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
        v = self.str(name)
        if v is None:
            return None
        try:
            n = int(v)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {v!r}") from None
        if minimum is not None and n < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {n}")
        if maximum is not None and n > maximum:
            raise ConfigError(f"{name}: must be <= {maximum}, got {n}")
        return n

    def float(self, name: str, default: float, minimum: float | None = None) -> float:
        v = self.str(name)
        if v is None:
            return default
        try:
            x = float(v)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {v!r}") from None
        if minimum is not None and x < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {x}")
        return x

    def bool(self, name: str, default: bool) -> bool:
        v = self.str(name)
        if v is None:
            return default
        low = v.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {v!r}")

    def _json(self, name: str) -> Any:
        v = self.str(name)
        if v is None:
            return None
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: not valid JSON: {e}") from None

    def json_map(self, name: str) -> dict[str, str]:
        v = self._json(name)
        if v is None:
            return {}
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise ConfigError(f"{name}: expected a JSON object of strings, got {v!r}")
        return {k: str(x) for k, x in v.items()}

    def json_list(self, name: str) -> list[Any]:
        v = self._json(name)
        if v is None:
            return []
        if not isinstance(v, list):
            raise ConfigError(f"{name}: expected a JSON list, got {v!r}")
        return v

    def prefix_table(self, name: str) -> dict[str, tuple[str, ...]] | None:
        """{namespace or "*": [s3:// prefix, ...]}; unset or {} = no allow-list (None)."""
        v = self._json(name)
        if not v:
            return None
        if not isinstance(v, dict):
            raise ConfigError(f"{name}: expected a JSON object {{namespace: [s3:// prefixes]}}, got {v!r}")
        out: dict[str, tuple[str, ...]] = {}
        for ns, prefixes in v.items():
            if ns != ANY_NAMESPACE and not _DNS_LABEL.match(ns):
                raise ConfigError(f"{name}: {ns!r} is neither a namespace name nor {ANY_NAMESPACE!r}")
            if not isinstance(prefixes, list):
                raise ConfigError(f"{name}[{ns!r}]: expected a list of s3:// prefixes, got {prefixes!r}")
            try:
                out[ns] = tuple(canonical_prefix(p) for p in prefixes)
            except PrefixError as e:
                raise ConfigError(f"{name}[{ns!r}]: {e}") from None
        return out
