"""Session fixtures shared by all tests: real speech made once per machine and cached.

Helpers add their own fixtures in their own test files; keep this file small.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from rvc_pipeline.demo.voices import CACHE_ROOT, arctic_sample, make_voice_set

# Bump when the voice set's recipe changes (files are cached under this key).
VOICES_VERSION = "v1-4x6s-32k"


def _cached_voice_set() -> Path:
    cache = CACHE_ROOT / "test-voices" / VOICES_VERSION
    if cache.is_dir() and len(list(cache.glob("*.wav"))) == 4:
        return cache
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_voice_set(tmp, n_files=4, seconds_each=6.0, seed=1234, sr=32000)
    shutil.rmtree(cache, ignore_errors=True)
    try:
        os.replace(tmp, cache)
    except OSError:  # another session won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


@pytest.fixture(scope="session")
def voice_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder with 4 real-speech WAVs (32 kHz, 16-bit, about 6 s each, several voices).

    The folder is a copy of a per-machine cache, so tests may add or delete files in it
    (but should copy it first if other tests need it intact: it is shared by the session).
    """
    src = _cached_voice_set()
    dst = tmp_path_factory.mktemp("voices")
    for p in sorted(src.glob("*.wav")):
        shutil.copy2(p, dst / p.name)
    return dst


@pytest.fixture(scope="session")
def arctic_wav() -> Path:
    """CMU Arctic arctic_a0007.wav (real human speech, 16 kHz); skips the test when unavailable."""
    p = arctic_sample()
    if p is None:
        pytest.skip("arctic_a0007.wav unavailable (pysptk sdist could not be downloaded)")
    return p


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's tests with one torch intra-op thread (small models on a busy 2-core machine are
    several times faster that way), restoring the previous count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No weight can be found or downloaded: an empty weights cache, no network look-up, no progress
    bars. Returns the (empty) cache folder."""
    cache = tmp_path / "weights-cache"
    monkeypatch.setenv("RVC_WEIGHTS_DIR", str(cache))
    monkeypatch.setenv("RVC_OFFLINE", "1")
    monkeypatch.setenv("RVC_NO_PROGRESS", "1")
    return cache
