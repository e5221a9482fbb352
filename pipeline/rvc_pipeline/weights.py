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

from rvc_pipeline.core.spec import ExperimentSpec
from rvc_pipeline.core.storage import StorageError, fetch_uri, open_storage

log = logging.getLogger("rvc_pipeline")

PUBLIC_BASE = "https://huggingface.co/lj1995/VoiceConversionWebUI/resolve/main/"
DEMO_WARNING = (
    "DEMO: {what} not found; using RANDOMLY INITIALISED weights. The pipeline runs end to end but the "
    "resulting voice is NOT meaningful. Supply real weights for real training."
)


class WeightsNotFound(FileNotFoundError):
    pass


def local_cache_dir() -> Path:
    d = Path(os.environ.get("RVC_WEIGHTS_DIR") or Path.home() / ".cache" / "rvc-operator" / "weights")
    return d


def _candidates(ref: str) -> list[str]:
    names = [ref]
    base = ref.rsplit("/", 1)[-1]
    if base != ref:
        names.append(base)
    return names


def resolve_weight(ref: str, spec: ExperimentSpec, *, what: str, allow_online: bool = True) -> Path:
    """Return a local path for the weight `ref`; raise WeightsNotFound with instructions."""
    endpoint, region = spec.storage.endpoint, spec.storage.region
    cache = local_cache_dir()
    if ref.startswith("s3://"):
        try:
            return fetch_uri(ref, cache / "s3" / ref[5:].rsplit("/", 1)[0], endpoint, region)
        except StorageError as e:
            if not e.permanent:
                raise  # the storage may come back: transient (exit 1), not "missing weights"
            raise WeightsNotFound(f"{what}: {e}") from None
    p = Path(ref).expanduser()
    if p.is_absolute() or ref.startswith("."):
        if p.exists():
            return p
        raise WeightsNotFound(f"{what}: {ref} does not exist")
    if p.exists() and p.is_file():
        return p
    tried: list[str] = []
    roots: list[str] = []
    if spec.weights_cache:
        roots.append(spec.weights_cache)
    roots.append(str(cache))
    for root in roots:
        for name in _candidates(ref):
            if root.startswith("s3://"):
                try:
                    st = open_storage(root, endpoint=endpoint, region=region)
                    if st.exists(name):
                        dest = cache / "s3" / root[5:] / name
                        if not dest.exists():
                            st.download(name, dest)
                        return dest
                except StorageError as e:
                    if not e.permanent:
                        raise  # an unreachable cache is not a missing file: transient (exit 1)
                    tried.append(f"{root}/{name} ({e})")
                    continue
            else:
                cand = Path(root).expanduser() / name
                if cand.exists():
                    return cand
            tried.append(f"{root.rstrip('/')}/{name}")
    if allow_online and os.environ.get("RVC_OFFLINE") != "1" and "/" not in ref.strip("/").split("/", 1)[-1]:
        url = PUBLIC_BASE + ref.strip("/")
        dest = cache / ref.strip("/")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".partial")
            log.info("%s: downloading %s", what, url)
            with urllib.request.urlopen(url, timeout=20) as r, open(tmp, "wb") as f:  # noqa: S310
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # noqa: BLE001 - any network failure means "not online"
            tried.append(f"{url} ({type(e).__name__})")
    raise WeightsNotFound(
        f"{what}: cannot find {ref!r}. Tried: {', '.join(tried)}. Put the file in {cache}/ (or set "
        f"spec.weightsCache / $RVC_WEIGHTS_DIR), or give an s3:// URI or path in the spec."
    )
