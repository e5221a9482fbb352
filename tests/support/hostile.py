"""Hostile weights files for the tests of rvc_pipeline.safeload (issue 8).

Every payload, if a loader ever ran it, would create the file `marker` (runnable payloads are checked
to really do so under a full unpickle in tests/unit/test_safeload.py). Pickles are assembled by hand
so that each names exactly the global it tries; `torch_zip` wraps one in torch's zip container the
way torch.save does, `write_legacy` writes it bare (no container: torch's legacy format path).
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"  # GLOBAL names with dots are looked up attribute by attribute from protocol 4


def g(module: str, name: str) -> bytes:
    """GLOBAL module name: push that object."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    """BINUNICODE: push a str."""
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def call(fn: bytes, *args: bytes) -> bytes:
    """fn(*args) through REDUCE."""
    return fn + b"(" + b"".join(args) + b"tR"


def getattr_(obj: bytes, name: str) -> bytes:
    return call(g("builtins", "getattr"), obj, s(name))


def py_touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def sh_touch(marker: Path) -> str:
    return f"touch '{marker}'"


def dict_of(**items: bytes) -> bytes:
    return b"}(" + b"".join(s(k) + v for k, v in items.items()) + b"u"


def torch_zip(pickle_bytes: bytes, path: Path) -> Path:
    """A torch.save-style zip container whose data.pkl is `pickle_bytes` (no tensor storages)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def write_legacy(pickle_bytes: bytes, path: Path) -> Path:
    path.write_bytes(pickle_bytes)
    return path


@dataclass(frozen=True)
class Payload:
    name: str
    category: str
    body: Callable[[Path], bytes]  # marker -> the pickled object (no PROTO/STOP)
    proto: bytes = PROTO2
    runs: bool = True  # a full unpickle would create the marker
    refused: str = ""  # what the refusal must name

    def pickle(self, marker: Path) -> bytes:
        return self.proto + self.body(marker) + b"."


def _chain_from_allowed(m: Path) -> bytes:
    """getattr chain from a global torch allows: _rebuild_tensor_v2.__globals__['sys'].modules['os']."""
    glb = getattr_(g("torch._utils", "_rebuild_tensor_v2"), "__globals__")
    sysmod = call(getattr_(glb, "get"), s("sys"))
    osmod = call(getattr_(getattr_(sysmod, "modules"), "get"), s("os"))
    return call(getattr_(osmod, "system"), s(sh_touch(m)))


def _import_chain(m: Path) -> bytes:
    return call(getattr_(call(g("builtins", "__import__"), s("os")), "system"), s(sh_touch(m)))


def _importlib_chain(m: Path) -> bytes:
    return call(getattr_(call(g("importlib", "import_module"), s("os")), "system"), s(sh_touch(m)))


def _inert_then_getattr(m: Path) -> bytes:
    """An allowed (inert) class used as the base of a getattr chain."""
    return call(getattr_(g("argparse", "Namespace"), "__init__"), s(sh_touch(m)))


PAYLOADS: list[Payload] = [
    # __reduce__ to a callable that runs code
    Payload("os.system", "reduce", lambda m: call(g("os", "system"), s(sh_touch(m))), refused="os.system"),
    Payload("posix.system", "reduce", lambda m: call(g("posix", "system"), s(sh_touch(m))),
            refused="posix.system"),
    Payload("subprocess.getoutput", "reduce",
            lambda m: call(g("subprocess", "getoutput"), s(sh_touch(m))), refused="subprocess.getoutput"),
    Payload("subprocess.Popen", "reduce",
            lambda m: call(g("subprocess", "Popen"), b"](" + s("touch") + s(str(m)) + b"e"),
            refused="subprocess.Popen"),
    Payload("builtins.exec", "reduce", lambda m: call(g("builtins", "exec"), s(py_touch(m))),
            refused="builtins.exec"),
    Payload("builtins.eval", "reduce", lambda m: call(g("builtins", "eval"), s(py_touch(m))),
            refused="builtins.eval"),
    Payload("__builtin__.eval", "reduce", lambda m: call(g("__builtin__", "eval"), s(py_touch(m))),
            refused="eval"),
    Payload("pickle.loads", "reduce",
            lambda m: call(g("pickle", "loads"),
                           call(g("_codecs", "encode"), s((PROTO2 + call(g("os", "system"), s(sh_touch(m)))
                                                            + b".").decode("latin-1")), s("latin-1"))),
            refused="pickle.loads"),
    # dotted names: module prefixes, attribute traversal inside the name
    Payload("torch serialization.os.system", "dotted",
            lambda m: call(g("torch", "serialization.os.system"), s(sh_touch(m))), proto=PROTO4,
            refused="torch.serialization.os.system"),
    Payload("os.path os.system", "dotted", lambda m: call(g("os.path", "os.system"), s(sh_touch(m))),
            proto=PROTO4, refused="os.path.os.system"),
    Payload("collections OrderedDict.__init__.__globals__", "dotted",
            lambda m: g("collections", "OrderedDict.__init__.__globals__"), proto=PROTO4, runs=False,
            refused="collections.OrderedDict.__init__.__globals__"),
    Payload("torch._utils sys.modules", "dotted", lambda m: g("torch._utils", "sys.modules"),
            proto=PROTO4, runs=False, refused="torch._utils.sys.modules"),
    Payload("omegaconf.dictconfig DictConfig.__init__", "dotted",
            lambda m: g("omegaconf.dictconfig", "DictConfig.__init__"), runs=False,
            refused="omegaconf.dictconfig.DictConfig.__init__"),
    Payload("fairseq.data.dictionary Dictionary.load", "dotted",
            lambda m: call(g("fairseq.data.dictionary", "Dictionary.load"), s(str(m))), proto=PROTO4,
            runs=False, refused="fairseq.data.dictionary.Dictionary.load"),
    Payload("os.path join", "dotted", lambda m: call(g("os.path", "join"), s("a"), s("b")), runs=False,
            refused="os.path.join"),
    # getattr chains
    Payload("getattr chain from torch._utils", "getattr", _chain_from_allowed, refused="builtins.getattr"),
    Payload("getattr(__import__('os'))", "getattr", _import_chain, refused="builtins.getattr"),
    Payload("getattr(import_module('os'))", "getattr", _importlib_chain, refused="builtins.getattr"),
    Payload("getattr on an allowed inert class", "getattr", _inert_then_getattr, runs=False,
            refused="builtins.getattr"),
    Payload("operator.attrgetter", "getattr",
            lambda m: call(call(g("operator", "attrgetter"), s("system")), g("os", "path")), runs=False,
            refused="operator.attrgetter"),
    # module globals
    Payload("os.environ", "module-global", lambda m: g("os", "environ"), runs=False, refused="os.environ"),
    Payload("sys.modules", "module-global", lambda m: g("sys", "modules"), runs=False, refused="sys.modules"),
    Payload("builtins.__import__", "module-global", lambda m: call(g("builtins", "__import__"), s("os")),
            runs=False, refused="builtins.__import__"),
    Payload("torch.load", "module-global", lambda m: call(g("torch", "load"), s(str(m) + ".inner")),
            runs=False, refused="torch.load"),
    Payload("torch.hub.load", "module-global", lambda m: g("torch.hub", "load"), runs=False,
            refused="torch.hub.load"),
    Payload("shutil.rmtree", "module-global", lambda m: call(g("shutil", "rmtree"), s(str(m) + ".nodir")),
            runs=False, refused="shutil.rmtree"),
    Payload("numpy.load", "module-global", lambda m: g("numpy", "load"), runs=False, refused="numpy.load"),
]


def payloads(category: str | None = None) -> list[Payload]:
    return [p for p in PAYLOADS if category is None or p.category == category]


# ---- payloads written by torch.save itself: objects whose __reduce__ runs code ------------------


class Touch:
    """Pickles as os.system("touch <marker>") (recorded by pickle as posix.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (os.system, (sh_touch(self.marker),))


class ExecTouch(Touch):
    def __reduce__(self):  # type: ignore[override]
        return (exec, (py_touch(self.marker),))


def valid_checkpoint(extra: dict | None = None) -> dict:
    """A tiny checkpoint shaped like ours (model, optimizer state, scaler, history)."""
    w = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(w.parameters())
    w(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt = {"model": w.state_dict(), "iteration": 3, "optimizer": opt.state_dict(), "learning_rate": 1e-4,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            "history": {"loss_g": [1.0, 0.5]}, "format": "rvc-operator/1"}
    ckpt.update(extra or {})
    return ckpt


def nested_in_checkpoint(marker: Path, path: Path, *, where: str = "extra", legacy: bool = False) -> Path:
    """A valid checkpoint with a payload hidden at `where` ('extra', 'optimizer', 'model')."""
    ckpt = valid_checkpoint()
    if where == "optimizer":
        ckpt["optimizer"]["state"][0]["exp_avg_sq"] = Touch(marker)
    elif where == "model":
        ckpt["model"]["bias"] = ExecTouch(marker)
    else:
        ckpt["extra"] = [1, {"deep": Touch(marker)}]
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


def fairseq_with_payload(marker: Path, path: Path, *, where: str) -> Path:
    """A fairseq-shaped file (model state dict, omegaconf DictConfig cfg, Dictionary task_state) with
    a payload as the cfg ('cfg'), inside the DictConfig's content ('content') or as the Dictionary's
    state ('dictionary'); assembled by hand so that the omegaconf/fairseq names are the real ones."""
    evil = call(g("os", "system"), s(sh_touch(marker)))
    content = dict_of(model=dict_of(encoder_layers=b"K\x02"), task=dict_of(normalize=b"\x89"))
    if where == "content":
        content = dict_of(model=evil)
    dictconfig = (g("omegaconf.dictconfig", "DictConfig") + b")\x81"
                  + dict_of(_metadata=b"N", _parent=b"N", _content=content) + b"b")
    dictionary = g("fairseq.data.dictionary", "Dictionary") + b")\x81" + dict_of(
        symbols=b"]" + s("<s>") + b"a", x=evil if where == "dictionary" else b"N") + b"b"
    body = dict_of(args=b"N", cfg=evil if where == "cfg" else dictconfig, model=b"}",
                   task_state=dict_of(dictionaries=b"]" + dictionary + b"a"))
    return torch_zip(PROTO2 + body + b".", path)


def full_unpickle_runs(data: bytes) -> None:
    """What an unsafe loader does (used only to prove a payload is real)."""
    pickle.loads(data)  # noqa: S301 - the point of the check


__all__ = ["PAYLOADS", "Payload", "fairseq_with_payload", "full_unpickle_runs", "nested_in_checkpoint",
           "payloads", "torch_zip", "valid_checkpoint", "write_legacy"]
