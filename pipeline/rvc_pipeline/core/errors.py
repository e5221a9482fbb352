"""One classification of failures into exit codes, shared by `rvc-pipeline` and the operator.

    0    success
    1    transient: the storage or network failed, or something unexpected; a retry may succeed
    2    bad spec or bad input: a retry with the same spec and data fails the same way (permanent)
    3    missing weights (permanent until someone supplies them)
    130  interrupted (Ctrl-C)
    143  preempted: SIGTERM, and the step saved what it had first (core.termination); transient

The operator stops retrying a step on 2 and 3 (`PERMANENT_EXIT_CODES`). Every foreseeable failure gets
one line naming the file, field or URI; only an unexpected exception is shown with its traceback.
The error types this table names are defined here (SpecError beside the spec it validates, re-exported);
this module imports nothing outside `rvc_pipeline.core`, and never torch (the operator image has none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rvc_pipeline.core.spec import SpecError
from rvc_pipeline.core.termination import EXIT_PREEMPTED, Preempted

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NO_WEIGHTS", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_TRANSIENT",
    "PERMANENT_EXIT_CODES", "Failure", "LeaseHeld", "SpecError", "StepFailed", "StorageError",
    "WeightsNotFound",
    "classify", "one_line", "s3_code_is_permanent",
]



class StepFailed(RuntimeError):
    """A step that cannot produce its outputs (bad data, no output). Permanent: retrying will not help."""


class WeightsNotFound(FileNotFoundError):
    """A weights file (HuBERT, RMVPE, pretrained G/D) found nowhere; the message says where to put it."""


class LeaseHeld(RuntimeError):
    """Another process is writing this experiment. Transient (exit 1): it may finish or expire."""


class StorageError(RuntimeError):
    """Storage that cannot be reached or used; the message names the URI.

    permanent: a retry cannot help (wrong credentials, no permission, no such bucket or object, a URI
    that is not usable); False means the storage may come back (timeouts, refused connections, 5xx).
    """

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent

    def __reduce__(self) -> tuple[object, ...]:  # keeps `permanent` across process pools
        return (type(self), self.args, {"permanent": self.permanent})


EXIT_OK = 0
EXIT_TRANSIENT = 1
EXIT_BAD_INPUT = 2
EXIT_NO_WEIGHTS = 3
EXIT_INTERRUPTED = 130
PERMANENT_EXIT_CODES: tuple[int, ...] = (EXIT_BAD_INPUT, EXIT_NO_WEIGHTS)

# S3 error codes (or the bare HTTP status of a HEAD answer) that no retry can fix: wrong or missing
# credentials, no permission, no such bucket/key, a request S3 refuses as malformed, the wrong region.
# Everything else (5xx, SlowDown, RequestTimeout, throttling, unknown codes) counts as transient.
PERMANENT_S3_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "AuthorizationHeaderMalformed",
    "InvalidAccessKeyId", "InvalidArgument", "InvalidBucketName", "InvalidObjectState", "InvalidRequest",
    "InvalidURI", "KeyTooLongError", "MethodNotAllowed", "NoSuchBucket", "NoSuchKey", "NotFound",
    "PermanentRedirect", "SignatureDoesNotMatch", "InvalidToken", "400", "401", "403", "404", "405", "301",
})

# botocore errors raised before any request (bad parameters, no credentials): permanent.
_PERMANENT_BOTO = frozenset({"ParamValidationError", "NoCredentialsError", "PartialCredentialsError",
                             "InvalidS3AddressingStyleError", "UnknownRegionError"})

# Our exception classes for a file that cannot be used, by qualified name (their modules import torch,
# so they are named here rather than imported).
_PERMANENT_BY_NAME = frozenset({
    "rvc_pipeline.components.pitch.rmvpe.RMVPEError", "rvc_pipeline.components.pitch.crepe.CrepeError",
    "rvc_pipeline.checkpoints.CheckpointCorrupt",
})

# Local file errors that name a path the user gave: permanent, one line.
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Failure:
    """How a failure ends: exit code, the one-line message, and whether it was foreseen (no traceback)."""

    code: int
    message: str
    expected: bool = True


def s3_code_is_permanent(code: str) -> bool:
    return code in PERMANENT_S3_CODES


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """A message as one line: lines joined with '; ', control characters escaped, at most `limit` chars."""
    joined = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    safe = _CONTROL.sub(lambda m: repr(m.group())[1:-1], joined)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def _named(e: BaseException, names: frozenset[str]) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in names for c in type(e).__mro__)


def _ours(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] == "rvc_pipeline"


def _boto(e: BaseException) -> Failure | None:
    if not type(e).__module__.startswith(("botocore", "boto3", "s3transfer")):
        return None
    resp = getattr(e, "response", None)
    code = str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""
    permanent = s3_code_is_permanent(code) or type(e).__name__ in _PERMANENT_BOTO
    return Failure(EXIT_BAD_INPUT if permanent else EXIT_TRANSIENT, f"S3: {e}")


def _os(e: OSError) -> Failure:
    if isinstance(e, _PERMANENT_OS):
        return Failure(EXIT_BAD_INPUT, str(e))
    return Failure(EXIT_TRANSIENT, f"{type(e).__name__}: {e}")  # network, disk full, I/O: may pass


def _classify(e: BaseException) -> Failure:
    if isinstance(e, WeightsNotFound):
        return Failure(EXIT_NO_WEIGHTS, str(e))
    if isinstance(e, (SpecError, StepFailed)):
        return Failure(EXIT_BAD_INPUT, str(e))
    if isinstance(e, StorageError):
        return Failure(EXIT_BAD_INPUT if e.permanent else EXIT_TRANSIENT, str(e))
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError: retrying will not help
        first = (str(e).splitlines() or [""])[0]
        return Failure(EXIT_BAD_INPUT, f"GPU out of memory ({first}); lower spec.train.batchSize or use a "
                                       "larger GPU")
    if isinstance(e, LeaseHeld):  # another writer holds the experiment: it may finish or expire
        return Failure(EXIT_TRANSIENT, str(e))
    if _ours(e) and (isinstance(e, ValueError) or _named(e, _PERMANENT_BY_NAME)):
        return Failure(EXIT_BAD_INPUT, str(e))  # a file or value we refused (model files, audio, ...)
    boto = _boto(e)
    if boto is not None:
        return boto
    if isinstance(e, OSError):
        return _os(e)
    return Failure(EXIT_TRANSIENT, f"{type(e).__name__}: {e}", expected=False)


def classify(e: BaseException) -> Failure:
    """Exit code and one-line message for an exception that ended a command."""
    if isinstance(e, Preempted):
        return Failure(EXIT_PREEMPTED, one_line(str(e) or "preempted (SIGTERM); what was done is saved, "
                                                          "rerun to continue"))
    if isinstance(e, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted; completed steps keep their markers, rerun to continue")
    f = _classify(e)
    return Failure(f.code, one_line(f.message or type(e).__name__), f.expected)
