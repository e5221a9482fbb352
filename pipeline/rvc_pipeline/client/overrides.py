"""An RVCExperiment from the typed spec's defaults, -f files and --set key=value, validated locally.

Layers, later ones win: the spec's defaults, each -f file (a spec mapping, or a whole manifest whose `spec`
is taken), --storage (storage.uri), each --set (dotted camelCase path, value read as YAML: 50, true,
[preprocess, f0], null = back to the default). dataset.source defaults to DEFAULT_DATASET_PREFIX under
storage.uri. Every error names the spec field and the option it came from (OverrideError: exit 2).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.alias_generators import to_camel

from rvc_pipeline.core.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    MAX_MANIFEST_BYTES,
    Experiment,
    ExperimentSpec,
    K8sName,
    SpecError,
)

DEFAULT_DATASET_PREFIX = "datasets/{name}/"
"""Where `submit` uploads the recordings when neither -f nor --set gives dataset.source: under storage.uri,
beside the experiment folders (`<storage>/logs/<name>/`)."""

Path_ = tuple[Union[str, int], ...]  # noqa: UP007 - a run-time alias (Python 3.10 needs Union)


class OverrideError(SpecError):
    """A bad -f file, --set or flag; the message names the spec field and the option (exit 2)."""


@dataclass
class Layers:
    """The spec mapping being built (camelCase keys) and which option set each path."""

    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[Path_, str] = field(default_factory=dict)

    def put(self, path: Path_, value: Any, source: str) -> None:
        _assign(self.data, path, value, source)
        self.origin = {p: s for p, s in self.origin.items() if p[: len(path)] != path}
        for leaf in _leaves(value, path):
            self.origin[leaf] = source

    def source_of(self, loc: Path_) -> str:
        """The option(s) behind an error at `loc` (the field itself, a parent, else its children)."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.origin:
                return self.origin[loc[:n]]
        below = sorted({s for p, s in self.origin.items() if p[: len(loc)] == loc})
        return ", ".join(below) if below else "the defaults"


def _leaves(value: Any, path: Path_) -> list[Path_]:
    if isinstance(value, Mapping) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, str(k)))]
    return [path]


def _assign(data: dict[str, Any], path: Path_, value: Any, source: str) -> None:
    """Set `path` in `data` (creating mappings; a list index may append); None removes the key."""
    cur: Any = data
    for i, key in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(cur, list):
            cur = _list_slot(cur, int(key), {} if isinstance(nxt, str) else [], path, source)
        else:
            if not isinstance(cur.get(key), (dict, list)):
                cur[key] = {} if isinstance(nxt, str) else []
            cur = cur[key]
    last = path[-1]
    if isinstance(cur, list):
        _list_slot(cur, int(last), value, path, source)
        cur[int(last)] = value
    elif value is None:
        cur.pop(last, None)
    else:
        cur[last] = value


def _list_slot(items: list[Any], index: int, empty: Any, path: Path_, source: str) -> Any:
    if index > len(items):
        raise OverrideError(f"{_dotted(path)}: index {index} skips items (the list has {len(items)}; "
                            f"use {len(items)} to add one) ({source})")
    if index == len(items):
        items.append(empty)
    return items[index]


def _dotted(path: Path_) -> str:
    return ".".join(["spec", *(str(p) for p in path)])


# ------------------------------------------------------------------------------ paths of the spec model
def _unwrap(ann: Any) -> Any:
    """The type inside Optional[...] / Annotated[...] (first non-None member of a union)."""
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
        else:
            return ann


def _model_field(model: type[BaseModel], key: str, path: Path_, source: str) -> Any:
    by_alias = {f.alias or n: f for n, f in model.model_fields.items()}
    if key in by_alias:
        return by_alias[key].annotation
    close = difflib.get_close_matches(to_camel(key), list(by_alias), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; fields here: {', '.join(by_alias)}"
    raise OverrideError(f"{_dotted(path)}: unknown field ({source}){hint}")


def check_path(path: Path_, source: str) -> None:
    """OverrideError when `path` is not a field of the spec (unknown name, or below a plain value)."""
    ann: Any = ExperimentSpec
    for i, key in enumerate(path):
        ann = _unwrap(ann)
        here = path[: i + 1]
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(key, str):
                raise OverrideError(f"{_dotted(here)}: {_dotted(path[:i])} is a mapping, not a list "
                                    f"({source})")
            ann = _model_field(ann, key, here, source)
        elif origin is list:
            if not isinstance(key, int):
                raise OverrideError(f"{_dotted(here)}: {_dotted(path[:i])} is a list; give an index "
                                    f"(e.g. {_dotted((*path[:i], 0))}) ({source})")
            ann = typing.get_args(ann)[0]
        elif origin is dict:
            return  # free keys (nodeSelector, score, affinity): the model checks them
        else:
            raise OverrideError(f"{_dotted(here)}: {_dotted(path[:i])} is a single value, not a mapping "
                                f"({source})")


# ------------------------------------------------------------------------------ the options
def parse_set(text: str) -> tuple[Path_, Any]:
    """--set KEY=VALUE -> (path, value). Path parts that are digits are list indexes."""
    key, eq, raw = text.partition("=")
    where = f"--set {text[:120]}"
    if not eq or not key.strip():
        raise OverrideError(f"{where}: expected KEY=VALUE with a dotted spec path, e.g. train.epochs=50")
    parts = key.strip().removeprefix("spec.").split(".")
    if any(not p for p in parts):
        raise OverrideError(f"{where}: empty part in the path {key!r}")
    path: Path_ = tuple(int(p) if p.isdigit() else p for p in parts)
    if isinstance(path[0], int):
        raise OverrideError(f"{where}: a path starts with a field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise OverrideError(f"{where}: the value is not valid YAML ({getattr(e, 'problem', None) or e})"
                            ) from None
    return path, value


def load_file(path: Path) -> dict[str, Any]:
    """The spec mapping of an -f file: a mapping of spec fields, or a manifest (its `spec`)."""
    where = f"-f {path}"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise OverrideError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OverrideError(f"{where}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise OverrideError(f"{where}: not a UTF-8 text file (byte {e.start})") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise OverrideError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}{at}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise OverrideError(f"{where}: expected a mapping of spec fields, got a YAML {type(doc).__name__}")
    if "kind" in doc or "spec" in doc:
        if doc.get("kind", KIND) != KIND:
            raise OverrideError(f"{where}: kind {doc.get('kind')!r} is not {KIND}")
        doc = doc.get("spec") or {}
        if not isinstance(doc, dict):
            raise OverrideError(f"{where}: spec must be a mapping")
    return doc


@dataclass(frozen=True)
class SubmitOptions:
    """What `submit` was given: the experiment name, --storage, -f files and --set texts, in order."""

    name: str
    storage: str | None = None
    files: tuple[Path, ...] = ()
    sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Built:
    """The validated experiment, the manifest to apply (the user's values only: the operator fills in its
    own defaults, e.g. resources.device) and where the recordings go."""

    experiment: Experiment
    manifest: dict[str, Any]
    dataset_uri: str


def _check_name(name: str) -> None:
    try:
        TypeAdapter(K8sName).validate_python(name)
    except ValidationError as e:
        raise OverrideError(f"metadata.name: {name[:80]!r} from --name: {e.errors()[0]['msg']}") from None


def build_layers(opts: SubmitOptions) -> Layers:
    """The spec mapping from the options (paths checked against the spec model, values not yet)."""
    layers = Layers()
    for f in opts.files:
        doc = load_file(f)
        for leaf in _leaves(doc, ()):
            if leaf:
                check_path(leaf, f"-f {f}")
        _merge(layers, doc, (), f"-f {f}")
    if opts.storage is not None:
        layers.put(("storage", "uri"), opts.storage, "--storage")
    for text in opts.sets:
        path, value = parse_set(text)
        check_path(path, f"--set {text}")
        layers.put(path, value, f"--set {text}")
    return layers


def _merge(layers: Layers, doc: Mapping[str, Any], base: Path_, source: str) -> None:
    for k, v in doc.items():
        path = (*base, str(k))
        if isinstance(v, Mapping) and isinstance(_get(layers.data, path), dict):
            _merge(layers, v, path, source)
        else:
            layers.put(path, v, source)


def _get(data: Any, path: Path_) -> Any:
    for k in path:
        data = data.get(k) if isinstance(data, dict) else None
    return data


def default_dataset(storage_uri: str, name: str) -> str:
    """`<storage.uri>/datasets/<name>/` (DEFAULT_DATASET_PREFIX)."""
    return f"{storage_uri.rstrip('/')}/{DEFAULT_DATASET_PREFIX.format(name=name)}"


def build(opts: SubmitOptions) -> Built:
    """The validated RVCExperiment of `submit`; OverrideError naming field and option on bad input."""
    _check_name(opts.name)
    layers = build_layers(opts)
    uri = _get(layers.data, ("storage", "uri"))
    if not uri:
        raise OverrideError("spec.storage.uri: required: give --storage s3://bucket/prefix (or storage.uri "
                            "in an -f file)")
    if not _get(layers.data, ("dataset", "source")) and isinstance(uri, str):
        layers.put(("dataset", "source"), default_dataset(uri, opts.name),
                   f"the default dataset prefix (<storage>/{DEFAULT_DATASET_PREFIX})")
    spec = validate(layers)
    for path in (("storage", "uri"), ("dataset", "source")):
        if not str(_get(layers.data, path)).startswith("s3://"):
            raise OverrideError(f"{_dotted(path)}: must be an s3:// URI on a cluster (step pods share no "
                                f"filesystem) ({layers.source_of(path)})")
    manifest = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": opts.name},
                "spec": typed(layers.data, spec.model_dump(mode="json", by_alias=True))}
    exp = Experiment(metadata={"name": opts.name}, spec=spec)
    try:
        _ = exp.name
    except SpecError as e:
        raise OverrideError(f"{e} (--name or spec.experimentName)") from None
    return Built(exp, manifest, spec.dataset.source)


def typed(given: Mapping[str, Any], dumped: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the user gave, with the values as validated (YAML's '2e-4' string -> 0.0002): the API
    server checks the types of the manifest."""
    return {k: _typed_value(v, dumped.get(k, v)) for k, v in given.items()}


def _typed_value(given: Any, dumped: Any) -> Any:
    if isinstance(given, Mapping) and isinstance(dumped, Mapping):
        return typed(given, dumped)
    if isinstance(given, list) and isinstance(dumped, list) and len(given) == len(dumped):
        return [_typed_value(g, d) for g, d in zip(given, dumped)]
    return dumped


def validate(layers: Layers) -> ExperimentSpec:
    """The typed spec of the layers; OverrideError with one line per bad field, naming its option."""
    try:
        return ExperimentSpec.model_validate(layers.data)
    except ValidationError as err:
        lines = [_error_line(e, layers) for e in err.errors()]
        raise OverrideError("; ".join(lines)) from None


def _error_line(e: Mapping[str, Any], layers: Layers) -> str:
    loc: Path_ = tuple(e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
        msg = f"got {_short(e.get('input'))}; allowed values: {e['ctx']['expected']}"
    elif e["type"] == "missing":
        msg = "required"
    return f"{_dotted(loc)}: {msg} ({layers.source_of(loc)})"


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."

