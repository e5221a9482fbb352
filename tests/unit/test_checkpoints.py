"""Checkpoints: RVC's keys, atomic writes, latest by file name, corrupt/incompatible files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from rvc_pipeline import checkpoints as ck
from rvc_pipeline.nn import build_generator, get_config
from rvc_pipeline.nn.weightnorm import weight_norm


class Small(torch.nn.Module):
    def __init__(self, ch: int = 4):
        super().__init__()
        self.conv = weight_norm(torch.nn.Conv1d(2, ch, 3))
        self.proj = torch.nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean(-1))


def _trained(seed: int = 0) -> tuple[Small, torch.optim.AdamW]:
    torch.manual_seed(seed)
    m = Small()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-9)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(3, 2, 8)).pow(2).mean().backward()
        opt.step()
    return m, opt


def test_save_has_rvc_keys_and_legacy_names(tmp_path: Path) -> None:
    m, opt = _trained()
    p = ck.save_checkpoint(tmp_path / "G_10.pth", m, opt, 1e-4, 3, {"global_step": 10})
    obj = torch.load(p, weights_only=True)
    assert {"model", "iteration", "optimizer", "learning_rate", "global_step"} <= set(obj)
    assert obj["iteration"] == 3 and obj["learning_rate"] == 1e-4 and obj["global_step"] == 10
    assert {"conv.weight_g", "conv.weight_v", "conv.bias", "proj.weight", "proj.bias"} == set(obj["model"])
    assert len(obj["optimizer"]["state"]) == 5
    assert not list(tmp_path.glob(".*tmp"))


def test_atomic_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, opt = _trained()
    p = ck.save_checkpoint(tmp_path / "G_2333333.pth", m, opt, 1e-4, 1)
    before = p.read_bytes()
    real_save = torch.save

    def dying_save(obj: object, f: object, *a: object, **k: object) -> None:
        f.write(b"PK\x03\x04 partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(p, m, opt, 1e-4, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert p.read_bytes() == before
    assert ck.read_checkpoint(p)["iteration"] == 1
    assert [x.name for x in tmp_path.iterdir()] == ["G_2333333.pth"]


def test_latest_by_file_name_number(tmp_path: Path) -> None:
    folder = tmp_path / "exp9999" / "logs" / "run42"  # digits in the path must not matter (RVC's bug)
    folder.mkdir(parents=True)
    for n in (200, 1000, 30):
        for pre in ("G_", "D_"):
            (folder / f"{pre}{n}.pth").write_bytes(b"x")
    (folder / "G_999.pth.partial").write_bytes(b"x")
    (folder / "G_5000.pth").write_bytes(b"x")  # no D_ sibling
    (folder / "Gx_7000.pth").write_bytes(b"x")
    assert ck.latest_checkpoint(folder, "G_").name == "G_5000.pth"
    assert ck.latest_checkpoint(folder, "D_").name == "D_1000.pth"
    assert [g.name for g, _ in ck.checkpoint_pairs(folder)] == ["G_1000.pth", "G_200.pth", "G_30.pth"]
    (folder / "G_2333333.pth").write_bytes(b"x")
    (folder / "G_3000000.pth").write_bytes(b"x")
    assert ck.latest_checkpoint(folder, "G_").name == "G_2333333.pth"  # the latest-only file
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    m, opt = _trained()
    p = ck.save_checkpoint(tmp_path / "G_4.pth", m, opt, 1e-4, 1)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointCorrupt, match="G_4.pth"):
        ck.read_checkpoint(p)
    (tmp_path / "G_5.pth").write_bytes(b"")
    with pytest.raises(ck.CheckpointCorrupt, match="empty"):
        ck.read_checkpoint(tmp_path / "G_5.pth")


def test_load_restores_model_and_optimizer(tmp_path: Path) -> None:
    m, opt = _trained(0)
    p = ck.save_checkpoint(tmp_path / "G_8.pth", m, opt, 1e-4, 4, {"global_step": 8})
    m2, opt2 = _trained(1)
    info = ck.load_checkpoint(p, m2, opt2)
    assert info["iteration"] == 4 and info["global_step"] == 8 and info["optimizer_restored"] is True
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        torch.testing.assert_close(s1[k]["exp_avg"], s2[k]["exp_avg"])
        torch.testing.assert_close(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"])


def test_key_by_key_load_and_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = Small(ch=6)
    p = ck.save_checkpoint(tmp_path / "G_1.pth", other, None, 1e-4, 1)
    m = Small(ch=4)
    before = m.proj.bias.detach().clone()
    with caplog.at_level(logging.INFO, logger="rvc_pipeline"):
        info = ck.load_checkpoint(p, m)
    assert sorted(s.split(" ")[0] for s in info["skipped_keys"]) == [
        "conv.bias", "conv.weight_g", "conv.weight_v", "proj.weight"]
    torch.testing.assert_close(m.proj.bias.detach(), other.proj.bias.detach())
    assert not torch.equal(before, m.proj.bias.detach())
    assert "conv.weight_v" in caplog.text
    with pytest.raises(ck.CheckpointIncompatible, match="mis-shaped"):
        ck.load_into(m, torch.load(p, weights_only=True)["model"], strict=True, what="x")


def test_other_architecture_is_a_clear_error() -> None:
    with torch.device("meta"):
        g_v2 = build_generator(get_config("v2", "40k"), "v2", True)
        g_v1 = build_generator(get_config("v1", "40k"), "v1", True)
        g_48 = build_generator(get_config("v2", "48k"), "v2", True)
    ck.check_model_compat(g_v2.state_dict(), g_v2, "v2", "40k", True, "same", "G")
    with pytest.raises(ck.CheckpointIncompatible, match="v1") as e:
        ck.check_model_compat(g_v1.state_dict(), g_v2, "v2", "40k", True, "pretrained generator X.pth", "G")
    assert "pretrained generator X.pth" in str(e.value)
    with pytest.raises(ck.CheckpointIncompatible, match="48k"):
        ck.check_model_compat(g_48.state_dict(), g_v2, "v2", "40k", True, "ckpt", "G")


def test_exported_small_model_is_not_a_checkpoint(tmp_path: Path) -> None:
    torch.save({"weight": {"a": torch.zeros(1)}, "config": [1], "info": "1epoch"}, tmp_path / "m.pth")
    with pytest.raises(ck.CheckpointIncompatible, match="not an RVC training checkpoint"):
        ck.read_checkpoint(tmp_path / "m.pth")
