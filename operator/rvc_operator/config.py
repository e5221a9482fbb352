"""Operator settings, read once at start-up from environment variables (the Helm chart sets them), with
pydantic-settings.

Every variable is documented in docs/operator.md. Bad values raise ConfigError naming the variable,
so a misconfigured operator fails at start instead of building broken Jobs. Unset or blank variables
keep the default.

    OperatorConfig.from_env()         the process environment (pydantic-settings' environment source)
    OperatorConfig.from_env(mapping)  only `mapping` (tests, the chart test)
    OperatorConfig(field=value, ...)  explicit values and defaults only; no environment is read
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .ownership import ANY_NAMESPACE, PrefixError, canonical_prefix


class ConfigError(ValueError):
    """An operator environment variable with an invalid value; the message names it."""


DEFAULT_GPU_IMAGE = "rvc-pipeline:latest"
DEFAULT_CPU_IMAGE = "rvc-pipeline-cpu:latest"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CHOICES = {"image_pull_policy": ("IfNotPresent", "Always", "Never"), "default_device": ("gpu", "cpu")}

# Which environment the settings read: None = none (plain construction), else this mapping.
_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("rvc_operator_env", default=None)


class _MappingSource(PydanticBaseSettingsSource):
    """Environment variables from a mapping (os.environ or a test's dict): only the RVC_* names of the
    fields, raw strings (the field validators below parse them)."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        name = str(field.validation_alias or field_name)
        return self.env.get(name), name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field_name, f in self.settings_cls.model_fields.items():
            value, name, _ = self.get_field_value(f, field_name)
            if value is not None:
                out[name] = value
        return out


JsonMap = Annotated[dict[str, str], NoDecode]
JsonList = Annotated[list[dict[str, Any]], NoDecode]
PrefixTable = Annotated[dict[str, tuple[str, ...]] | None, NoDecode]


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, populate_by_name=True, extra="ignore", case_sensitive=True)

    pipeline_image: str = Field(DEFAULT_GPU_IMAGE, validation_alias="RVC_PIPELINE_IMAGE")
    cpu_image: str = Field(DEFAULT_CPU_IMAGE, validation_alias="RVC_PIPELINE_CPU_IMAGE")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", validation_alias="RVC_IMAGE_PULL_POLICY")
    default_device: Literal["gpu", "cpu"] = Field("gpu", validation_alias="RVC_DEFAULT_DEVICE")
    gpu_node_selector: JsonMap = Field(default_factory=dict, validation_alias="RVC_GPU_NODE_SELECTOR")
    gpu_tolerations: JsonList = Field(default_factory=list, validation_alias="RVC_GPU_TOLERATIONS")
    cpu_node_selector: JsonMap = Field(default_factory=dict, validation_alias="RVC_CPU_NODE_SELECTOR")
    priority_class: str | None = Field(None, validation_alias="RVC_PRIORITY_CLASS")
    job_active_deadline_seconds: int = Field(86400, ge=1, validation_alias="RVC_JOB_ACTIVE_DEADLINE_SECONDS")
    job_backoff_limit: int = Field(3, ge=0, validation_alias="RVC_JOB_BACKOFF_LIMIT")
    job_ttl_seconds: int | None = Field(None, ge=0, validation_alias="RVC_JOB_TTL_SECONDS")
    step_max_retries: int = Field(2, ge=0, validation_alias="RVC_STEP_MAX_RETRIES")
    retry_backoff_seconds: float = Field(30.0, ge=0.0, validation_alias="RVC_STEP_RETRY_BACKOFF_SECONDS")
    retry_backoff_max_seconds: float = Field(900.0, ge=0.0,
                                             validation_alias="RVC_STEP_RETRY_BACKOFF_MAX_SECONDS")
    max_concurrent_experiments: int = Field(0, ge=0, validation_alias="RVC_MAX_CONCURRENT_EXPERIMENTS")
    pushgateway: str | None = Field(None, validation_alias="RVC_PUSHGATEWAY")
    s3_endpoint: str | None = Field(None, validation_alias="RVC_S3_ENDPOINT")
    s3_credentials_secret: str | None = Field(None, validation_alias="RVC_S3_CREDENTIALS_SECRET")
    service_account: str | None = Field(None, validation_alias="RVC_SERVICE_ACCOUNT")
    host_network: bool = Field(False, validation_alias="RVC_HOST_NETWORK")
    metrics_port: int = Field(8080, ge=0, le=65535, validation_alias="RVC_METRICS_PORT")
    health_port: int = Field(8081, ge=0, le=65535, validation_alias="RVC_HEALTH_PORT")
    run_as_user: int = Field(1000, ge=1, validation_alias="RVC_RUN_AS_USER")
    scratch_size_limit: str | None = Field(None, validation_alias="RVC_SCRATCH_SIZE_LIMIT")
    weights_cache: str | None = Field(None, validation_alias="RVC_WEIGHTS_CACHE")
    delete_artifacts_default: bool = Field(False, validation_alias="RVC_DELETE_ARTIFACTS_DEFAULT")
    watch_namespace: str | None = Field(None, validation_alias="RVC_WATCH_NAMESPACE")
    reconcile_interval: float = Field(10.0, ge=1.0, validation_alias="RVC_RECONCILE_INTERVAL")
    # namespace ("*": any other) -> allowed s3:// prefixes of experiment folders; None: no allow-list
    storage_allowed_prefixes: PrefixTable = Field(None, validation_alias="RVC_STORAGE_ALLOWED_PREFIXES")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment that from_env chose (no .env file, no secrets dir)."""
        env = _ENV.get()
        if env is None:
            return (init_settings,)
        if env is os.environ:
            return (init_settings, env_settings)
        return (init_settings, _MappingSource(settings_cls, env))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """The settings from the process environment (or only from `env`); ConfigError names a bad one."""
        with _reading(os.environ if env is None else env):
            try:
                return cls()
            except ValidationError as e:
                raise ConfigError(_first_error(e)) from None

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """Environment values (keyed by variable name) are stripped; a blank one keeps the default."""
        if not isinstance(data, dict):
            return data
        out = {}
        for k, v in data.items():
            if isinstance(v, str) and k.startswith("RVC_"):
                v = v.strip()
                if not v:
                    continue
            out[k] = v
        return out

    @field_validator("image_pull_policy", "default_device", mode="before")
    @classmethod
    def _choice(cls, v: Any, info: Any) -> Any:
        allowed = _CHOICES[info.field_name]
        if not isinstance(v, str):
            return v
        for a in allowed:
            if v.lower() == a.lower():
                return a
        raise ValueError(f"got {v!r}; allowed values: {list(allowed)}")

    @field_validator("gpu_node_selector", "cpu_node_selector", mode="before")
    @classmethod
    def _json_map(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        d = _json(v)
        if d is None:
            return {}
        if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
            raise ValueError(f"expected a JSON object of strings, got {d!r}")
        return {k: str(x) for k, x in d.items()}

    @field_validator("gpu_tolerations", mode="before")
    @classmethod
    def _json_list(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        d = _json(v)
        if d is None:
            return []
        if not isinstance(d, list):
            raise ValueError(f"expected a JSON list, got {d!r}")
        return d

    @field_validator("storage_allowed_prefixes", mode="before")
    @classmethod
    def _prefix_table(cls, v: Any) -> Any:
        return prefix_table(_json(v)) if isinstance(v, str) else v


@contextmanager
def _reading(env: Mapping[str, str]) -> Iterator[None]:
    token = _ENV.set(env)
    try:
        yield
    finally:
        _ENV.reset(token)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None


def prefix_table(v: Any) -> dict[str, tuple[str, ...]] | None:
    """{namespace or "*": [s3:// prefix, ...]}; unset or {} = no allow-list (None)."""
    if not v:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"expected a JSON object {{namespace: [s3:// prefixes]}}, got {v!r}")
    out: dict[str, tuple[str, ...]] = {}
    for ns, prefixes in v.items():
        if ns != ANY_NAMESPACE and not _DNS_LABEL.match(ns):
            raise ValueError(f"{ns!r} is neither a namespace name nor {ANY_NAMESPACE!r}")
        if not isinstance(prefixes, list):
            raise ValueError(f"[{ns!r}]: expected a list of s3:// prefixes, got {prefixes!r}")
        try:
            out[ns] = tuple(canonical_prefix(p) for p in prefixes)
        except PrefixError as e:
            raise ValueError(f"[{ns!r}]: {e}") from None
    return out


def _first_error(e: ValidationError) -> str:
    """'RVC_NAME[0]: what is wrong' for the first error (the variable name, then the index in its JSON)."""
    err = e.errors()[0]
    loc = err.get("loc") or ("?",)
    where = str(loc[0]) + "".join(f"[{x!r}]" if isinstance(x, str) else f"[{x}]" for x in loc[1:])
    ctx = err.get("ctx") or {}
    msg = str(ctx["error"]) if err.get("type") == "value_error" and "error" in ctx else err.get("msg", "")
    return f"{where}: {msg}"
