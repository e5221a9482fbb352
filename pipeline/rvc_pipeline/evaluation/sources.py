"""spec.eval.reference: a local folder or an s3:// prefix of source-speaker clips for the previews."""

from __future__ import annotations

from pathlib import Path

from rvc_pipeline.core.folders import AUDIO_SUFFIXES


def reference_files(uri: str, limit: int, endpoint: str | None = None, region: str | None = None
                    ) -> list[Path]:
    """The first `limit` audio files (by key) under `uri`, as local paths (S3 objects are downloaded to a
    scratch folder). No audio there is a ValueError naming the location."""
    from rvc_pipeline.core.storage import open_storage, scratch_dir

    store = open_storage(uri, endpoint=endpoint, region=region)
    keys = sorted(o.key for o in store.list("") if o.key.lower().endswith(AUDIO_SUFFIXES))[:limit]
    if not keys:
        raise ValueError(f"spec.eval.reference: no audio files ({', '.join(AUDIO_SUFFIXES)}) under {uri}")
    local = store.local_path()
    if local is not None:
        return [local / k for k in keys]
    dest = scratch_dir("rvc-eval-ref-")
    out = []
    for i, k in enumerate(keys):
        target = dest / f"{i:03d}_{Path(k).name}"
        store.download(k, target)
        out.append(target)
    return out
