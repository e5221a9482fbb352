"""rvc_pipeline.safeload: the one loader that can never run code from a file (issue 8).

Every payload in tests/support/hostile.py is first shown to be real (a full unpickle runs it and
creates its marker file), then refused by the loader, in torch's zip container and bare (legacy
format), with an error naming the file and the refused object; the marker must not exist."""

from __future__ import annotations

import argparse
import os
import pickle
import time
import zipfile
from pathlib import Path

import pytest
import torch
from rvc_pipeline import checkpoints as ck
from rvc_pipeline import safeload
from rvc_pipeline.components.embedders.fairseq_convert import load_fairseq_checkpoint, plain
from rvc_pipeline.core import errors
from rvc_pipeline.core.errors import StepFailed

from tests.support import hostile
from tests.support.fairseq_hubert import HubertConfig, HubertModel, save_fairseq_checkpoint
from tests.support.hostile import PAYLOADS, Payload, call, dict_of, g, s, torch_zip, write_legacy

RUNNABLE = [p for p in PAYLOADS if p.runs]


def _wait_for(path: Path, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("payload", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_payloads_are_real(tmp_path: Path, payload: Payload) -> None:
    """The control: without the safe loader, each runnable payload does run."""
    marker = tmp_path / "ran"
    hostile.full_unpickle_runs(payload.pickle(marker))
    assert _wait_for(marker), payload.name


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_saved_payloads_are_real(tmp_path: Path, legacy: bool) -> None:
    """The control for payloads written by torch.save: a full torch.load runs them."""
    for i, where in enumerate(("extra", "optimizer", "model")):
        marker = tmp_path / f"ran{i}"
        path = hostile.nested_in_checkpoint(marker, tmp_path / f"G_{i}.pth", where=where, legacy=legacy)
        torch.load(path, weights_only=False)  # what read_checkpoint's old fallback did
        assert _wait_for(marker), where
    marker = tmp_path / "ran-fairseq"
    with pytest.raises(ModuleNotFoundError):  # its DictConfig needs omegaconf, but the cfg ran first
        torch.load(hostile.fairseq_with_payload(marker, tmp_path / "h.pt", where="cfg"), weights_only=False)
    assert _wait_for(marker)


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("payload", PAYLOADS, ids=[p.name for p in PAYLOADS])
def test_every_payload_is_refused_naming_file_and_object(tmp_path: Path, payload: Payload,
                                                          container: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / f"evil-{container}.pth"
    (torch_zip if container == "zip" else write_legacy)(payload.pickle(marker), path)
    with pytest.raises(safeload.UnsafeFile) as err:
        safeload.load(path, what="training checkpoint")
    msg = str(err.value)
    assert msg.startswith(f"{path}: refused: it needs the Python object '"), msg
    assert payload.refused in msg and "never contains" in msg and "nothing in the file was run" in msg
    assert not _wait_for(marker, 0.05 if payload.name != "subprocess.Popen" else 1.0)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("where", ["extra", "optimizer", "model"])
def test_payload_nested_in_a_valid_checkpoint_is_refused(tmp_path: Path, where: str, legacy: bool) -> None:
    marker = tmp_path / "ran"
    path = hostile.nested_in_checkpoint(marker, tmp_path / "G_999.pth", where=where, legacy=legacy)
    name = "builtins.exec" if where == "model" else "posix.system"
    with pytest.raises(safeload.UnsafeFile, match=rf"G_999\.pth: refused: .*'{name}'"):
        ck.read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["cfg", "content", "dictionary"])
def test_payload_in_a_fairseq_file_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "ran"
    path = hostile.fairseq_with_payload(marker, tmp_path / "hubert_base.pt", where=where)
    with pytest.raises(safeload.UnsafeFile, match=r"hubert_base\.pt: refused: .*'os\.system'"):
        load_fairseq_checkpoint(path)
    assert not marker.exists()
    # the same file without the payload loads, its config as plain data
    clean = hostile.fairseq_with_payload(marker, tmp_path / "clean.pt", where="none")
    state, cfg = load_fairseq_checkpoint(clean)
    assert state == {} and cfg == {"model": {"encoder_layers": 2}, "task": {"normalize": False}}


class _Stack4:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("protocol", [0, 1, 3, 4, 5])
def test_other_pickle_protocols_are_refused_with_the_object_named(tmp_path: Path, protocol: int) -> None:
    """pickle.dumps output (no torch container): STACK_GLOBAL/FRAME (4, 5), text GLOBAL (0, 1, 3)."""
    marker = tmp_path / "ran"
    path = write_legacy(pickle.dumps(_Stack4(marker), protocol=protocol), tmp_path / "p.pt")
    with pytest.raises(safeload.UnsafeFile, match=r"p\.pt: refused: .*posix\.system"):
        safeload.load(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save, to write the archive
def test_inst_opcode_and_persistent_ids_and_torchscript_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    inst = write_legacy(f"(S'touch {marker}'\nios\nsystem\n.".encode(), tmp_path / "inst.pt")
    with pytest.raises(safeload.UnsafeFile, match=r"inst\.pt: refused: .*INST \(creating a 'os\.system'\)"):
        safeload.load(inst)
    pid = torch_zip(hostile.PROTO2 + s("not-a-storage") + b"Q.", tmp_path / "pid.pt")
    with pytest.raises(safeload.UnsafeFile, match=r"pid\.pt: refused: it builds Python objects"):
        safeload.load(pid)
    # REDUCE of an allowed class that is not a callable of torch's table: no way to call anything
    red = torch_zip(hostile.PROTO2 + call(g("torch", "Size"), b"](K\x01e") + b".", tmp_path / "size.pt")
    assert safeload.load(red) == torch.Size([1])  # torch.Size is data, and allowed
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(safeload.UnsafeFile, match=r"script\.pt: refused: it is a TorchScript archive"):
        safeload.load(script)
    assert not marker.exists()


def test_corrupt_files_are_unreadable_not_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save(hostile.valid_checkpoint(), good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "head.pth": data[:100],
        "garbage.pth": bytes(range(256)) * 8,
        "text.pth": b"not a checkpoint",
        "random.pth": os.urandom(4096),
        "empty.pth": b"",
        "zip-without-pickle.pth": b"",
    }
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
    with zipfile.ZipFile(tmp_path / "zip-without-pickle.pth", "w") as z:
        z.writestr("archive/version", "3\n")
    legacy = tmp_path / "legacy.pth"
    torch.save(hostile.valid_checkpoint(), legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy-truncated.pth").write_bytes(legacy.read_bytes()[:300])
    for name in [*cases, "legacy-truncated.pth"]:
        with pytest.raises(safeload.UnreadableFile, match=rf"{name.replace('.', chr(92) + '.')}: "):
            safeload.load(tmp_path / name)
        with pytest.raises(ck.CheckpointCorrupt):  # so training falls back to the previous checkpoint
            ck.read_checkpoint(tmp_path / name)
    with pytest.raises(safeload.UnreadableFile, match="no such file"):
        safeload.load(tmp_path / "missing.pth")


def test_legitimate_files_load(tmp_path: Path) -> None:
    ours = hostile.valid_checkpoint()
    for legacy in (False, True):
        p = tmp_path / f"G_{int(legacy)}.pth"
        torch.save(ours, p, _use_new_zipfile_serialization=not legacy)
        got = ck.read_checkpoint(p)
        assert got["iteration"] == 3 and got["history"] == {"loss_g": [1.0, 0.5]}
        assert torch.equal(got["model"]["weight"], ours["model"]["weight"])
        assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], ours["optimizer"]["state"][0]["exp_avg"])
    # RVC's pretrained f0G40k.pth style: fp16 OrderedDict state dict; fairseq's argparse args
    torch.save({"model": torch.nn.Linear(2, 2).half().state_dict()}, tmp_path / "f0G40k.pth")
    assert ck.read_checkpoint(tmp_path / "f0G40k.pth")["model"]["weight"].dtype == torch.float16
    torch.save({"args": argparse.Namespace(encoder_layers=2, _name="hubert"), "model": {}}, tmp_path / "a.pt")
    obj = safeload.load(tmp_path / "a.pt")
    assert isinstance(obj["args"], safeload.InertObject) and obj["args"].origin == "argparse.Namespace"
    assert plain(obj["args"]) == {"encoder_layers": 2, "_name": "hubert"}


def _omegaconf_metadata() -> bytes:
    """omegaconf >= 2.1's ContainerMetadata as pickled: typing.Any, builtins.dict, defaultdict(dict)."""
    state = dict_of(ref_type=g("typing", "Any"), object_type=g("builtins", "dict"), optional=b"\x88",
                    key=b"N", flags=b"}", resolver_cache=call(g("collections", "defaultdict"),
                                                              g("builtins", "dict")),
                    key_type=g("typing", "Any"), element_type=g("typing", "Any"))
    return g("omegaconf.base", "ContainerMetadata") + b")\x81" + state + b"b"


def test_omegaconf_and_fairseq_classes_load_as_inert_data(tmp_path: Path) -> None:
    node = g("omegaconf.nodes", "AnyNode") + b")\x81" + dict_of(_val=s("gelu"), _metadata=b"N") + b"b"
    lst = (g("omegaconf.listconfig", "ListConfig") + b")\x81"
           + dict_of(_metadata=_omegaconf_metadata(), _content=b"](" + s("km") + b"e") + b"b")
    cfg = (g("omegaconf.dictconfig", "DictConfig") + b")\x81"
           + dict_of(_metadata=_omegaconf_metadata(), _parent=b"N",
                     _content=dict_of(activation_fn=node, labels=lst)) + b"b")
    path = torch_zip(hostile.PROTO2 + dict_of(cfg=cfg, model=b"}") + b".", tmp_path / "h.pt")
    obj = safeload.load(path)
    assert isinstance(obj["cfg"], safeload.InertObject)
    assert plain(obj["cfg"]) == {"activation_fn": "gelu", "labels": ["km"]}
    # what the repo's own fairseq writer produces reads back too (tests/unit/test_hubert.py checks more)
    m = HubertModel(HubertConfig(conv_layers=[(8, 10, 5)], embed_dim=16, ffn_dim=16, heads=2,
                                               layers=1, conv_pos=4, conv_pos_groups=2, final_dim=4))
    state, cfg_plain = load_fairseq_checkpoint(save_fairseq_checkpoint(m, tmp_path / "w.pt"))
    assert cfg_plain["model"]["encoder_embed_dim"] == 16 and "mask_emb" in state


def test_inert_objects_run_nothing_and_the_allow_list_is_exact() -> None:
    for name, cls in safeload.INERT.items():
        obj = cls("os.system", "x", key=1)  # REDUCE / NEWOBJ arguments are only stored
        obj.__setstate__({"__class__": "x", "__reduce__": "y"})  # BUILD only stores the state
        assert obj.args == ("os.system", "x") and obj.state == {"__class__": "x", "__reduce__": "y"}
        assert type(obj) is cls and obj.origin == name and not hasattr(obj, "__dict__")
    for name, value in safeload.ALLOWED.items():
        module, _, attr = name.rpartition(".")
        assert module and attr and "." not in attr  # one exact name each, no prefixes
        assert (value in safeload.INERT.values() or value in (dict, list, tuple, int, float, str, bool)
                or value is safeload._plain_defaultdict), name
    assert safeload._plain_defaultdict(os.system) == {}


def test_plain_bounds_shared_and_deep_structures() -> None:
    x: list = []
    for _ in range(40):  # 2**40 paths through 40 shared lists: refused, not walked
        x = [x, x]
    with pytest.raises(ValueError, match="too large"):
        plain(x)
    deep: list = []
    for _ in range(60):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        plain(deep)


def test_refusal_is_a_permanent_bad_input_error(tmp_path: Path) -> None:
    e = safeload.UnsafeFile(tmp_path / "x.pth", "reason")
    assert isinstance(e, StepFailed) and isinstance(e, ValueError)
    assert errors.classify(e).code == errors.EXIT_BAD_INPUT and errors.classify(e).expected
