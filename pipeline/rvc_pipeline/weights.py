"""Where weights come from: HuBERT (hubert_base.pt), RMVPE (rmvpe.pt), pretrained G/D.

Resolution order for a weight given as `ref` (URI, path or bare RVC name such as
`pretrained_v2/f0G40k.pth`):
1. an s3:// URI or an existing local path: that file;
2. the cache folders: spec.weightsCache (path or s3://), $RVC_WEIGHTS_DIR, ~/.cache/rvc-operator/weights
   (also the bare file name under each);
3. when online, the public location RVC users download them from (Hugging Face
   lj1995/VoiceConversionWebUI), saved into the local cache;
4. otherwise WeightsNotFound, which says where to put the file.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

from rvc_pipeline.core.errors import StorageError, WeightsNotFound
from rvc_pipeline.core.fileio import atomic_write
from rvc_pipeline.core.spec import ExperimentSpec
from rvc_pipeline.core.storage import fetch_uri, open_storage

log = logging.getLogger("rvc_pipeline")

PUBLIC_BASE = "https://huggingface.co/lj1995/VoiceConversionWebUI/resolve/main/"
DEMO_WARNING = (
    "DEMO: {what} not found; using RANDOMLY INITIALISED weights. The pipeline runs end to end but the "
    "resulting voice is NOT meaningful. Supply real weights for real training."
)


def local_cache_dir() -> Path:
    d = Path(os.environ.get("RVC_WEIGHTS_DIR") or Path.home() / ".cache" / "rvc-operator" / "weights")
    return d


def _candidates(ref: str) -> list[str]:
    names = [ref]
    base = ref.rsplit("/", 1)[-1]
    if base != ref:
        names.append(base)
    return names


def _given(ref: str, spec: ExperimentSpec, cache: Path, what: str) -> Path | None:
    """An s3:// URI or an explicit or existing local path: that file (WeightsNotFound when it is not
    there); None for a name to look up in the caches."""
    if ref.startswith("s3://"):
        try:
            return fetch_uri(ref, cache / "s3" / ref[5:].rsplit("/", 1)[0], spec.storage.endpoint,
                             spec.storage.region)
        except StorageError as e:
            if not e.permanent:
                raise  # the storage may come back: transient (exit 1), not "missing weights"
            raise WeightsNotFound(f"{what}: {e}") from None
    p = Path(ref).expanduser()
    if p.is_absolute() or ref.startswith("."):
        if p.exists():
            return p
        raise WeightsNotFound(f"{what}: {ref} does not exist")
    return p if p.exists() and p.is_file() else None


def _from_s3_cache(root: str, name: str, spec: ExperimentSpec, cache: Path) -> Path | None:
    """`name` under the s3:// cache `root`, downloaded into the local cache once; None when absent."""
    st = open_storage(root, endpoint=spec.storage.endpoint, region=spec.storage.region)
    if not st.exists(name):
        return None
    dest = cache / "s3" / root[5:] / name
    if not dest.exists():
        st.download(name, dest)
    return dest


def _in_cache(root: str, name: str, spec: ExperimentSpec, cache: Path, tried: list[str]) -> Path | None:
    """`name` in one cache folder (path or s3://); None (and a note in `tried`) when it is not there."""
    if root.startswith("s3://"):
        try:
            found = _from_s3_cache(root, name, spec, cache)
        except StorageError as e:
            if not e.permanent:
                raise  # an unreachable cache is not a missing file: transient (exit 1)
            tried.append(f"{root}/{name} ({e})")
            return None
    else:
        cand = Path(root).expanduser() / name
        found = cand if cand.exists() else None
    if found is None:
        tried.append(f"{root.rstrip('/')}/{name}")
    return found


def _search_caches(ref: str, spec: ExperimentSpec, cache: Path, tried: list[str]) -> Path | None:
    """`ref` (or its bare file name) in spec.weightsCache, then the local cache; None when in neither."""
    for root in ([spec.weights_cache] if spec.weights_cache else []) + [str(cache)]:
        for name in _candidates(ref):
            found = _in_cache(root, name, spec, cache, tried)
            if found is not None:
                return found
    return None


def _download(ref: str, cache: Path, what: str, tried: list[str]) -> Path | None:
    """RVC's public copy of `ref`, saved into the local cache; None (and a note in `tried`) on failure."""
    url = PUBLIC_BASE + ref.strip("/")
    dest = cache / ref.strip("/")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s: downloading %s", what, url)
        with urllib.request.urlopen(url, timeout=20) as r, atomic_write(dest) as f:  # noqa: S310
            while chunk := r.read(1 << 20):
                f.write(chunk)
        return dest
    except Exception as e:  # noqa: BLE001 - any network failure means "not online"
        tried.append(f"{url} ({type(e).__name__})")
        return None


def resolve_weight(ref: str, spec: ExperimentSpec, *, what: str, allow_online: bool = True) -> Path:
    """Return a local path for the weight `ref`; raise WeightsNotFound with instructions."""
    cache = local_cache_dir()
    found = _given(ref, spec, cache, what)
    tried: list[str] = []
    if found is None:
        found = _search_caches(ref, spec, cache, tried)
    public = "/" not in ref.strip("/").split("/", 1)[-1]  # a bare name or one folder deep
    if found is None and allow_online and os.environ.get("RVC_OFFLINE") != "1" and public:
        found = _download(ref, cache, what, tried)
    if found is not None:
        return found
    raise WeightsNotFound(
        f"{what}: cannot find {ref!r}. Tried: {', '.join(tried)}. Put the file in {cache}/ (or set "
        f"spec.weightsCache / $RVC_WEIGHTS_DIR), or give an s3:// URI or path in the spec."
    )
