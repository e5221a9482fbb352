"""One table of exit codes: permanent failures 2/3, transient 1, interrupted 130; one line, no traceback
for anything foreseen; the operator reads the same codes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from rvc_pipeline.core import errors
from rvc_pipeline.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NO_WEIGHTS,
    EXIT_TRANSIENT,
    LeaseHeld,
    SpecError,
    StepFailed,
    StorageError,
    WeightsNotFound,
    classify,
    one_line,
)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


class OutOfMemoryError(RuntimeError):  # stands for torch.cuda.OutOfMemoryError (matched by name)
    pass


@pytest.mark.parametrize(("exc", "code", "expected"), [
    (SpecError("spec.f0.method: got 'yin'"), EXIT_BAD_INPUT, True),
    (StepFailed("dataset /x: no files"), EXIT_BAD_INPUT, True),
    (WeightsNotFound("hubert: cannot find 'hubert_base.pt'"), EXIT_NO_WEIGHTS, True),
    (StorageError("s3://b/k: access denied (AccessDenied)", permanent=True), EXIT_BAD_INPUT, True),
    (StorageError("s3://b/k: cannot reach S3 endpoint"), EXIT_TRANSIENT, True),
    (LeaseHeld("logs/alice is being written by bob@host:12"), EXIT_TRANSIENT, True),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore"), EXIT_BAD_INPUT, True),
    (_client_error("AccessDenied", 403), EXIT_BAD_INPUT, True),
    (_client_error("NoSuchBucket", 404), EXIT_BAD_INPUT, True),
    (_client_error("SlowDown", 503), EXIT_TRANSIENT, True),
    (_client_error("InternalError", 500), EXIT_TRANSIENT, True),
    (ParamValidationError(report="Invalid bucket name"), EXIT_BAD_INPUT, True),
    (NoCredentialsError(), EXIT_BAD_INPUT, True),
    (EndpointConnectionError(endpoint_url="http://x:1"), EXIT_TRANSIENT, True),
    (ReadTimeoutError(endpoint_url="http://x:1"), EXIT_TRANSIENT, True),
    (ConnectionRefusedError(111, "Connection refused"), EXIT_TRANSIENT, True),
    (TimeoutError("timed out"), EXIT_TRANSIENT, True),
    (OSError(28, "No space left on device"), EXIT_TRANSIENT, True),
    (PermissionError(13, "Permission denied", "/data/voices"), EXIT_BAD_INPUT, True),
    (FileNotFoundError(2, "No such file or directory", "/data/x.wav"), EXIT_BAD_INPUT, True),
    (ValueError("operands could not be broadcast"), EXIT_TRANSIENT, False),  # not ours: a bug, traceback
    (ZeroDivisionError("division by zero"), EXIT_TRANSIENT, False),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, True),
])
def test_classification_table(exc: BaseException, code: int, expected: bool) -> None:
    f = classify(exc)
    assert (f.code, f.expected) == (code, expected), f
    assert f.message and "\n" not in f.message


@pytest.mark.parametrize(("module", "name"), [
    ("rvc_pipeline.audio", "AudioError"), ("rvc_pipeline.export", "ModelFileError"),
    ("rvc_pipeline.infer", "InferError"), ("rvc_pipeline.checkpoints", "CheckpointIncompatible"),
    ("rvc_pipeline.checkpoints", "CheckpointCorrupt"),
    ("rvc_pipeline.components.pitch.rmvpe", "RMVPEError"),
    ("rvc_pipeline.components.pitch.crepe", "CrepeError"),
    ("rvc_pipeline.components.pitch.fcpe", "FCPEError"), ("rvc_pipeline.safeload", "UnsafeFile"),
    ("rvc_pipeline.safeload", "UnreadableFile"),
])
def test_our_refused_files_are_permanent(module: str, name: str) -> None:
    """Our exceptions for a file or value we refuse (a ValueError of ours, or named in errors.py)."""
    cls = getattr(importlib.import_module(module), name)
    exc = cls("/w/hubert_base.pt", "needs os.system") if name == "UnsafeFile" else cls("/w/x.pth: bad")
    f = classify(exc)
    assert (f.code, f.expected) == (EXIT_BAD_INPUT, True)
    assert "/w/" in f.message


def test_permanent_names_resolve_to_real_classes() -> None:
    for qual in errors._PERMANENT_BY_NAME:
        module, _, name = qual.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), qual


def test_oom_message_says_what_to_change() -> None:
    msg = classify(OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\ndetails")).message
    assert msg == ("GPU out of memory (CUDA out of memory. Tried to allocate 2 GiB); "
                   "lower spec.train.batchSize or use a larger GPU")


def test_one_line_escapes_terminal_controls_and_bounds_length() -> None:
    hostile = "dataset s3://b/\x1b[2J\x1b[31mevil\x07.wav:\r\nno audio\x00" + "x" * 5000
    line = one_line(hostile)
    assert "\x1b" not in line and "\r" not in line and "\n" not in line and "\x00" not in line
    assert line.startswith("dataset s3://b/\\x1b[2J\\x1b[31mevil\\x07.wav:; no audio\\x00xxx")
    assert len(line) == errors.MAX_MESSAGE and line.endswith("...")


def test_s3_codes_from_one_table() -> None:
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoSuchBucket", "403"):
        assert errors.s3_code_is_permanent(code)
    for code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "503", ""):
        assert not errors.s3_code_is_permanent(code)


def test_operator_uses_the_same_codes() -> None:
    from rvc_operator import jobs

    assert jobs.PERMANENT_EXIT_CODES == errors.PERMANENT_EXIT_CODES == (EXIT_BAD_INPUT, EXIT_NO_WEIGHTS)
    assert EXIT_TRANSIENT not in errors.PERMANENT_EXIT_CODES


def test_importing_errors_does_not_import_torch() -> None:
    code = ("import json, sys\nimport rvc_pipeline.core.errors\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'boto3'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_storage_error_keeps_its_kind_across_processes() -> None:
    """Steps fetch in process pools: a permanent StorageError must not come back as a transient one."""
    import pickle

    for permanent in (True, False):
        back = pickle.loads(pickle.dumps(StorageError("s3://b/k: access denied", permanent=permanent)))
        assert back.permanent is permanent and str(back) == "s3://b/k: access denied"
        assert classify(back).code == (EXIT_BAD_INPUT if permanent else EXIT_TRANSIENT)
