"""The one loader for every weights file: nothing in a file can ever run.

Every checkpoint, pretrained file, exported model, embedder, RMVPE/CREPE weight file and cache goes
through `load`: `torch.load(..., weights_only=True, map_location="cpu")`, whose unpickler resolves a
global only by an exact "module.Name" look-up in a fixed table (torch's own tensor/storage/dtype
entries plus `ALLOWED` below) and calls, instantiates or fills only what that table holds. There are
no module prefixes, no dotted-name traversal and no fallback to a full unpickle.

Config objects of other libraries (omegaconf's DictConfig/ListConfig/nodes, fairseq's Dictionary,
argparse.Namespace) load as instances of `InertObject` subclasses that only store what the file
holds; nothing runs on construction or `__setstate__`. A file that needs any other global, or that
builds objects in a way a weights file never does, is refused with `UnsafeFile` (a `StepFailed`:
permanent, exit code 2), naming the file and what it needed. A file that is not a readable torch file
(truncated, garbage) raises `UnreadableFile`, which callers report as corrupt.

What RVC's `hubert_base.pt` (fairseq HuBERT base, ls960) needs beyond torch's own table: only
`fairseq.data.dictionary.Dictionary` (its `cfg` is plain data); older fairseq files carry
`argparse.Namespace` args, newer ones omegaconf containers. Those are all listed in `ALLOWED`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from rvc_pipeline.core.errors import StepFailed

__all__ = ["ALLOWED", "InertObject", "UnreadableFile", "UnsafeFile", "load"]


class UnsafeFile(StepFailed, ValueError):
    """A file that needs more than tensors and plain data: refused before anything of it could run."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: refused: {reason}; nothing in the file was run")


class UnreadableFile(ValueError):
    """Not a readable torch file (truncated, empty, garbage); callers report it as corrupt."""


class InertObject:
    """Stands for a config object of another library: it holds what the file holds and runs nothing."""

    __slots__ = ("args", "state")
    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: __new__ stored the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


def _inert(origin: str) -> type[InertObject]:
    return type(origin.rsplit(".", 1)[1], (InertObject,), {"__slots__": (), "origin": origin})


def _plain_defaultdict(*args: Any) -> dict[Any, Any]:
    """collections.defaultdict(factory) read as a plain dict: the factory is never kept or called."""
    return {}


_FOREIGN_CLASSES = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    "fairseq.data.dictionary.Dictionary",
    "argparse.Namespace",
    "typing.Any",
)
INERT: dict[str, type[InertObject]] = {name: _inert(name) for name in _FOREIGN_CLASSES}

ALLOWED: dict[str, Any] = {
    **INERT,
    "collections.defaultdict": _plain_defaultdict,
    # type references inside configs (omegaconf's object_type, fairseq's args); calling one only
    # converts data that itself came through this table
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.tuple": tuple,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.str": str,
    "builtins.bool": bool,
}
"""Exact "module.Name" -> the object the unpickler uses, on top of torch's weights_only table."""

_LOCK = threading.Lock()  # torch keeps the extra globals in one process-wide set
_SAFE_GLOBALS = [(obj, name) for name, obj in ALLOWED.items()]


def load(path: str | Path, *, what: str = "weights file") -> Any:
    """Read a torch file on CPU without running anything from it.

    UnsafeFile if it needs a global outside torch's table and `ALLOWED`, or other pickle machinery;
    UnreadableFile if it is not a readable torch file. `what` names the file's role in messages."""
    p = Path(path)
    if not p.is_file():
        raise UnreadableFile(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    if p.stat().st_size == 0:
        raise UnreadableFile(f"{p}: empty file")
    try:
        with _LOCK, torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused below anyway
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _classify(p, str(e), what) from None
    except RuntimeError as e:
        raise _classify_runtime(p, str(e), what) from None
    except Exception as e:  # noqa: BLE001 - anything else (EOFError, struct.error, ...) is a broken file
        raise UnreadableFile(f"{p}: cannot be read, probably truncated ({type(e).__name__}: "
                             f"{_first_line(str(e))})") from None


def _first_line(msg: str) -> str:
    return (msg.strip().splitlines() or [""])[0][:200]


_GLOBAL_RE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_STRUCTURE = ("Trying to call reduce", "Can only ", "persistent_load", "Only persistent_load",
              "must be imported to load")


def _classify(p: Path, msg: str, what: str) -> Exception:
    """The weights-only unpickler's refusal as UnsafeFile; a stream it cannot parse as UnreadableFile."""
    m = _GLOBAL_RE.search(msg)
    if m:
        name = m.group(1)
        name = name if "." in name else f"builtins.{name}"  # torch drops the "builtins." prefix
        return UnsafeFile(p, f"it needs the Python object {name!r}, which a {what} never contains")
    if any(s in msg for s in _STRUCTURE):
        detail = next(line.strip() for line in msg.splitlines()
                      if any(s in line for s in _STRUCTURE))
        return UnsafeFile(p, f"it builds Python objects in a way a {what} never does ({detail[:200]})")
    if "Unsupported operand" in msg:
        found = _foreign_opcode(p)
        if found:
            return UnsafeFile(p, f"it uses the pickle instruction {found}, which a {what} never needs")
    return UnreadableFile(f"{p}: cannot be read, probably truncated or not a PyTorch file "
                          f"({_first_line(msg.split('WeightsUnpickler error:')[-1])})")


def _classify_runtime(p: Path, msg: str, what: str) -> Exception:
    if "TorchScript" in msg:
        return UnsafeFile(p, f"it is a TorchScript archive (code, not a {what})")
    if "legacy .tar format" in msg:
        return UnsafeFile(p, "it is in torch's legacy .tar format, which the safe loader does not read")
    return UnreadableFile(f"{p}: cannot be read, probably truncated ({_first_line(msg)})")


# pickle instructions torch's weights_only unpickler implements (torch/_weights_only_unpickler.py)
_SUPPORTED_OPS = frozenset({
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT",
    "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID",
    "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                         "SHORT_BINSTRING", "BINSTRING"})


def _pickle_stream(p: Path) -> bytes:
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(name) if name else b""
    with open(p, "rb") as f:
        return f.read(1 << 24)


def _foreign_opcode(p: Path) -> str | None:
    """The instruction outside the weights-only set that a well-formed pickle in the file uses (one that
    loads or creates a Python object if any: STACK_GLOBAL/INST/OBJ, with its name), found by parsing
    without executing; None if there is none or the stream is not a well-formed pickle (garbage)."""
    try:
        buf = io.BytesIO(_pickle_stream(p))
        for _ in range(5):  # a legacy file is a few pickles in a row (magic, version, info, object, keys)
            found = _scan_one(buf)
            if found:
                return found
    except Exception:  # noqa: BLE001 - not a well-formed pickle: garbage, not a refusal
        return None
    return None


def _scan_one(buf: io.BytesIO) -> str | None:
    """Parse one pickle up to its STOP (ValueError if malformed); its most telling foreign instruction."""
    strings: list[str] = []
    found: str | None = None
    for op, arg, _pos in pickletools.genops(buf):
        if op.name in _STRING_OPS:
            strings.append(str(arg))
        if op.name in ("STACK_GLOBAL", "INST", "OBJ") and (found is None or "'" not in found):
            found = _describe(op.name, arg, strings)
        elif found is None and op.name not in _SUPPORTED_OPS:
            found = op.name
    return found


def _describe(op: str, arg: Any, strings: list[str]) -> str:
    if op == "STACK_GLOBAL" and len(strings) >= 2:
        return f"STACK_GLOBAL (loading the Python object '{strings[-2]}.{strings[-1]}')"
    if op == "INST" and arg:
        return f"INST (creating a '{str(arg).replace(' ', '.')}')"
    return op

