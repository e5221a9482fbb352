"""The pitch-method interface and its registry.

A method takes a batch of 16 kHz mono clips (float, 1-D) and the number of 10 ms frames wanted for each
(p_len = len(clip) // 160) and returns, per clip, f0 in Hz (float64, 0 = unvoiced) of exactly that length,
frame i centred on sample 160 * i. Each file in this package registers its classes with `@register`, and
declares them in its `CATALOG` literal (read by rvc_pipeline.core.catalog without importing the file).
`get(name)` imports the file the catalog names and returns the method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rvc_pipeline.core.catalog import PITCH, Registry

SR = 16000
HOP = 160
F0_MIN = 50.0
F0_MAX = 1100.0


class PitchMethod(ABC):
    """One pitch tracker. `opts` are method-specific (device, model choice, loaded model ...)."""

    name: str = ""

    @abstractmethod
    def extract(self, clips: Sequence[np.ndarray], p_lens: Sequence[int], **opts: Any) -> list[np.ndarray]:
        """f0 per clip, p_lens[i] frames each."""

    def spec_options(self, spec: Any) -> dict[str, Any]:
        """Options the f0 step passes to `extract`, read from an RVCExperiment spec (device is added):
        by default the local files of its weights."""
        return self.weight_options(self.resolve_weights(self.weight_refs(spec), spec))

    def provenance(self, spec: Any, opts: dict[str, Any]) -> dict[str, Any]:
        """What, besides the method's name, makes its outputs (recorded; a change recomputes them)."""
        return {}

    # weights: the files its CATALOG lists under `weights`, each found like every weight (resolve_weight)
    weights_label: str = ""
    """How errors name its weights (default "<name> weights")."""

    def required_weights(self) -> tuple[str, ...]:
        """The catalog weights that are found like every weight and handed to it by path; () for a method
        that finds its own files."""
        return PITCH[self.name].weights

    def weight_refs(self, spec: Any) -> dict[str, str]:
        """Required weight name -> the reference (URI, path or bare name) the spec gives for it."""
        return {name: name for name in self.required_weights()}

    def resolve_weights(self, refs: Mapping[str, str], spec: Any, *, allow_online: bool = True
                        ) -> dict[str, str]:
        """Catalog weight name -> local path of the file `refs` names (WeightsNotFound names it)."""
        if not refs:
            return {}
        from rvc_pipeline.weights import resolve_weight

        what = self.weights_label or f"{self.name} weights"
        return {name: str(resolve_weight(ref, spec, what=what, allow_online=allow_online))
                for name, ref in refs.items()}

    def weight_options(self, paths: Mapping[str, str]) -> dict[str, Any]:
        """The `extract` options that hand it the local files of its weights (catalog name -> path)."""
        return {}

    def infer_f0(self, x: np.ndarray, p_len: int, filter_radius: int = 3, **opts: Any) -> np.ndarray:
        """f0 of one padded clip as RVC's inference (`Pipeline.get_f0`) computes it before transposing:
        the training extraction, unless a method post-processes there (harvest's median filter)."""
        return self.extract([x], [p_len], **opts)[0]


REGISTRY: Registry[type[PitchMethod]] = Registry("pitch method", PITCH)
register = REGISTRY.register


def get(name: str) -> PitchMethod:
    """The pitch method `name`; ValueError naming the choices for an unknown one."""
    return REGISTRY.cls(name, label="f0 method")()


def needed_weights(spec: Any) -> dict[str, str]:
    """The weights the spec's pitch method needs (catalog name -> the spec's reference to it); the
    catalog answers without importing the method when it needs none."""
    method = spec.f0.method
    return get(method).weight_refs(spec) if PITCH[method].weights else {}


def weights_key(method: str) -> str:
    """The marker key recording the identity of `method`'s weights (other weights make f0 stale)."""
    return f"{method}_weights"


_MODELS: dict[tuple[str, ...], Any] = {}


def cached(key: tuple[str, ...], load: Callable[[], Any]) -> Any:
    """A model loaded once per process (the step's workers and inference reuse it)."""
    if key not in _MODELS:
        _MODELS[key] = load()
    return _MODELS[key]


def fit_length(f0: np.ndarray, p_len: int) -> np.ndarray:
    """Cut or right-pad with zeros (unvoiced) to p_len frames."""
    f0 = np.asarray(f0, dtype=np.float64)
    if len(f0) >= p_len:
        return f0[:p_len].copy()
    return np.pad(f0, (0, p_len - len(f0)))


def pad_centred(f0: np.ndarray, p_len: int) -> np.ndarray:
    """RVC's pm padding: (p_len - len + 1)//2 zeros on the left, the rest on the right."""
    f0 = np.asarray(f0, dtype=np.float64)
    left = (p_len - len(f0) + 1) // 2
    right = p_len - len(f0) - left
    if left > 0 or right > 0:
        f0 = np.pad(f0, (max(left, 0), max(right, 0)))
    return f0[:p_len]
