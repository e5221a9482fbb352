"""Files that appear whole or not at all, the one 16 kHz reader and the one device rule.

Every file the pipeline writes goes through `atomic_path` / `atomic_write`: the data goes to a fresh
temporary file in the target's folder, named `.<pid>.<random>.<name>.partial` (hidden; storage listings
and uploads skip `*.partial`; each step's clean-up patterns `*.partial` and `*.<ext>.partial` remove what a
killed writer left), is fsync'ed, then replaces the target in one rename. A kill or an exception leaves
the previous file (or none), never a torn one; two writers of one file (DDP ranks) never share a
temporary file.

Importing this module imports neither torch nor numpy (the operator imports core): they are imported
inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rvc_pipeline.core.errors import StepFailed

if TYPE_CHECKING:
    import numpy as np

    Decoder = Callable[[Path, int], np.ndarray]

log = logging.getLogger("rvc_pipeline")

SR_16K = 16000
PARTIAL_SUFFIX = ".partial"
# soundfile reads these exactly as ffmpeg decodes them (integer / 2^(bits-1), or the float itself), so the
# fast path gives the same samples as RVC's ffmpeg load_audio; lossy formats always go through `decode`
_EXACT_SUBTYPES = frozenset({"PCM_16", "PCM_24", "PCM_32", "FLOAT"})


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path` (see the module docstring for the pattern)."""
    return path.with_name(f".{os.getpid()}.{secrets.token_hex(4)}.{path.name}{PARTIAL_SUFFIX}")


def temp_glob(name_pattern: str) -> str:
    """The glob of the temporary files a killed writer of files named `name_pattern` may have left."""
    return f".*.{name_pattern}{PARTIAL_SUFFIX}"


def _fsync(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, *, exclusive: bool = False, fsync: bool = True,
                sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path beside `path`; the file the block writes there becomes `path` when it ends.

    The file is fsync'ed, then renamed over `path`; `exclusive` hard-links it to `path` instead and
    raises FileExistsError when `path` exists (atomic, also on NFS). `sync_dir` also fsyncs the folder,
    so that the rename itself survives a power cut (checkpoints, exported models). On an exception in
    the block the temporary file is removed and `path` is left as it was. The folder must exist.

    `fsync=False` is for bulk, re-creatable files (audio pieces, f0 and feature arrays, downloads into
    scratch): still atomic against kills, but not flushed one by one (measured here: 1-3 ms more per
    file under load, about +0.2-0.7 s on the f0 benchmark's 206 files), as they were written before.
    """
    dst = Path(path)
    tmp = temp_path(dst)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        if exclusive:
            os.link(tmp, dst)
        else:
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a rename; the second name after a link or a failure
    if sync_dir:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder
            _fsync(dst.parent, folder=True)


@contextlib.contextmanager
def atomic_write(path: Path | str, *, exclusive: bool = False, fsync: bool = True,
                 sync_dir: bool = False) -> Iterator[IO[bytes]]:
    """`atomic_path` with the temporary file open for binary writing (torch.save, np.save, wavfile.write)."""
    with atomic_path(path, exclusive=exclusive, fsync=fsync, sync_dir=sync_dir) as tmp, open(tmp, "xb") as f:
        yield f


def write_bytes_atomic(path: Path | str, data: bytes, *, exclusive: bool = False) -> bool:
    """Write `data` as the whole of `path`; with `exclusive` only when `path` does not exist (else False)."""
    try:
        with atomic_write(path, exclusive=exclusive) as f:
            f.write(data)
    except FileExistsError:
        if not exclusive or not Path(path).exists():
            raise
        return False
    return True


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def save_npy_atomic(path: Path | str, arr: np.ndarray, *, fsync: bool = True) -> None:
    """np.save `arr` to exactly `path` (no suffix added, no pickled objects), atomically."""
    import numpy as np

    with atomic_write(path, fsync=fsync) as f:
        np.save(f, arr, allow_pickle=False)


def read_16k(path: Path | str, decode: Decoder | None = None) -> np.ndarray:
    """Float32 mono samples of `path` at 16 kHz: the one reader of 16 kHz audio.

    A 16 kHz mono file that soundfile reads exactly (PCM or float: what preprocess writes) is read as is,
    bit-identical to RVC's ffmpeg `load_audio`. Anything else goes to `decode(path, 16000)` when given
    (rvc_pipeline.audio.load_audio: ffmpeg resamples and down-mixes); without `decode` the file must be
    16 kHz (channels are averaged), else StepFailed names it.
    """
    import numpy as np
    import soundfile as sf

    p = Path(path)
    try:
        with sf.SoundFile(str(p)) as f:
            exact = f.samplerate == SR_16K and f.channels == 1 and f.subtype in _EXACT_SUBTYPES
            x = f.read(dtype="float32", always_2d=True) if exact or decode is None else None
            sr = f.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        if decode is not None:
            return decode(p, SR_16K)
        raise StepFailed(f"{p.name}: cannot read audio: {e}") from None
    if x is None:  # read only when exact or without a decoder
        assert decode is not None
        return decode(p, SR_16K)
    if sr != SR_16K:
        raise StepFailed(f"{p.name}: sample rate {sr} Hz; 16000 Hz expected")
    return np.ascontiguousarray(x[:, 0]) if x.shape[1] == 1 else x.mean(axis=1)


def pick_device(want: str | None = "auto", *, what: str = "pipeline") -> str:
    """The one device rule. `want`:

    * 'auto' (or empty): CUDA when a device is visible, else the CPU;
    * 'gpu' (spec.resources.device): CUDA when visible, else the CPU with a warning naming `what`;
    * 'cuda' / 'cuda:N': as asked; StepFailed when no CUDA device is visible;
    * anything else ('cpu', 'mps'): as given.
    torch is imported only here, and not at all for 'cpu'.
    """
    w = (want or "auto").strip()
    if w == "cpu":
        return w
    import torch

    visible = torch.cuda.is_available()
    if w in ("auto", "gpu"):
        if not visible and w == "gpu":
            log.warning("%s: resources.device is gpu but no CUDA device is visible; running on the CPU", what)
        return "cuda" if visible else "cpu"
    if w.startswith("cuda") and not visible:
        raise StepFailed(f"device {w!r}: no CUDA device is visible")
    return w


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 matrix products and convolutions natively (AVX512-BF16 or AMX: oneDNN's
    test); elsewhere bf16 is emulated and slower than fp32. Imports torch."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA); what `pick_device` decides on."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
