"""Which components exist, read without importing them (no torch): name -> module, GPU use, weights, speed.

Every file `rvc_pipeline/components/<kind>/<module>.py` that offers components declares them in one
module-level literal, read here with `ast.literal_eval` (the file is parsed, never executed):

    CATALOG = {"harvest": {"needs_gpu": False, "weights": [], "speed": 3.5}}

* needs_gpu: runs a network that uses a GPU when `resources.device` is gpu (the operator then requests
  one for the step); such components run in spawned worker processes (torch's thread pools do not
  survive fork);
* weights: the files it needs, by bare name (found like every weight: spec reference, weights cache);
* speed: seconds of audio one CPU process handles per second (bench/bench_f0.py on a 2-core machine),
  used to size worker pools;
* rank (optional, default 100): position in menus and error messages (then by name), so existing
  choices keep their order when one is added.

So adding a component is one new file; the spec's allowed values, the CLI's choices, inference and the
operator's GPU decision all read PITCH / EMBEDDERS below (then regenerate the CRD).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

_COMPONENTS = Path(__file__).resolve().parent.parent / "components"
_PACKAGE = "rvc_pipeline.components"


class CatalogError(ValueError):
    """A component file declares its CATALOG wrongly (a programming error, found at import)."""


@dataclass(frozen=True)
class Component:
    name: str
    module: str  # importable module path, e.g. rvc_pipeline.components.pitch.fcpe
    needs_gpu: bool
    weights: tuple[str, ...]
    speed: float
    rank: int = 100


def _declared(path: Path) -> dict[str, object]:
    """The literal assigned to CATALOG at the top level of `path` ({} when there is none)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = list(node.targets), node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if [t.id for t in targets if isinstance(t, ast.Name)] == ["CATALOG"]:
            found = ast.literal_eval(value)
            if not isinstance(found, dict):
                raise CatalogError(f"{path}: CATALOG must be a dict literal")
            return found
    return {}


_KEYS = {"needs_gpu", "weights", "speed", "rank"}


def _entry(name: str, module: str, raw: object, where: Path) -> Component:
    if not isinstance(raw, dict) or not {"needs_gpu", "weights", "speed"} <= set(raw) <= _KEYS:
        raise CatalogError(f"{where}: CATALOG[{name!r}] needs needs_gpu, weights, speed (and may have rank)")
    weights, speed, rank = raw["weights"], raw["speed"], raw.get("rank", 100)
    if not isinstance(raw["needs_gpu"], bool):
        raise CatalogError(f"{where}: CATALOG[{name!r}]['needs_gpu'] must be True or False")
    if not isinstance(weights, list | tuple) or not all(isinstance(w, str) for w in weights):
        raise CatalogError(f"{where}: CATALOG[{name!r}]['weights'] must be a list of file names")
    if isinstance(speed, bool) or not isinstance(speed, int | float) or speed <= 0:
        raise CatalogError(f"{where}: CATALOG[{name!r}]['speed'] must be a positive number")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise CatalogError(f"{where}: CATALOG[{name!r}]['rank'] must be an integer")
    return Component(name, module, raw["needs_gpu"], tuple(weights), float(speed), rank)


def discover(kind: str, root: Path = _COMPONENTS) -> dict[str, Component]:
    """Every component of `kind` (a folder under components/), by rank, then name."""
    found: dict[str, Component] = {}
    folder = root / kind
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
        module = f"{_PACKAGE}.{kind}.{path.stem}"
        for name, raw in _declared(path).items():
            if not isinstance(name, str) or not name.isidentifier() or name in found:
                raise CatalogError(f"{path}: component name {name!r} is not a new identifier")
            found[name] = _entry(name, module, raw, path)
    return dict(sorted(found.items(), key=lambda kv: (kv[1].rank, kv[0])))


# pitch trackers: components/pitch/<module>.py
PITCH: dict[str, Component] = discover("pitch")
PITCH_METHODS: tuple[str, ...] = tuple(PITCH)
METRICS: dict[str, Component] = discover("metrics")
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
# content embedders: components/embedders/<module>.py declare CATALOG the same way (filled by that package)
EMBEDDERS: dict[str, Component] = discover("embedders")


T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """The classes of one kind of component by name. A file declares its names in CATALOG (`declared`)
    and marks each class with `@registry.register(name)`; `cls(name)` imports that file on first use.
    `what` names the kind in errors ("pitch method"); `on_register` fills class attributes."""

    def __init__(self, what: str, declared: Mapping[str, Component],
                 on_register: Callable[[T, str], None] | None = None) -> None:
        self.what, self.declared, self.on_register = what, declared, on_register
        self.classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: the class is `name`, which its file's CATALOG must declare (LookupError)."""

        def deco(cls: T) -> T:
            if name not in self.declared:
                raise LookupError(f"{self.what} {name!r}: not declared in its file's CATALOG")
            setattr(cls, "name", name)  # noqa: B010 (T is any class)
            if self.on_register is not None:
                self.on_register(cls, name)
            self.classes[name] = cls
            return cls

        return deco

    def cls(self, name: str, label: str | None = None) -> T:
        """The class of `name`; ValueError naming the choices for an unknown one (as `label`: name)."""
        if name not in self.declared:
            raise ValueError(f"{label or self.what} {name!r}: expected one of {', '.join(self.declared)}")
        if name not in self.classes:
            importlib.import_module(self.declared[name].module)
        return self.classes[name]

    def __contains__(self, name: Any) -> bool:
        return name in self.classes


def pitch_needs_gpu(method: str) -> bool:
    """Whether pitch `method` runs a network that should get a GPU (False for unknown names)."""
    entry = PITCH.get(method)
    return entry is not None and entry.needs_gpu
