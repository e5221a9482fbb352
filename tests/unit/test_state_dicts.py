"""State dicts equal RVC's exactly (reference/state-dicts/*.tsv and §8.6), in every weight-norm spelling."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest
import torch
from rvc_pipeline.nn import (
    DiscriminatorP,
    build_generator,
    discriminator_shapes,
    generator_shapes,
    get_config,
    param_count,
    to_parametrization_names,
)
from rvc_pipeline.nn.weightnorm import compute_weight, remove_weight_norm, weight_norm
from torch import nn

# the reference TSVs: a copy inside the repo if there is one, else the shared reference folder
_CANDIDATES = [
    Path(__file__).resolve().parents[1] / "data" / "state-dicts",
    Path(__file__).resolve().parents[3] / "shared" / "reference" / "state-dicts",
    Path("/work/shared/reference/state-dicts"),
]
REF = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


# small convs on a shared 2-core machine run much faster on one intra-op thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TSV_NAMES = [
    f"G-{v}-{sr}-{f}" for v in ("v1", "v2") for sr in ("32k", "40k", "48k") for f in ("f0", "nof0")
] + ["D-v1", "D-v2"]

# §8.6: (tensors, parameters) where the reference gives them
PARAM_COUNTS = {
    "G-v2-40k-f0": (560, 36_458_818),
    "G-v1-40k-f0": (560, 36_360_514),
    "G-v2-40k-nof0": (549, 36_387_392),
    "G-v2-48k-f0": (560, 37_638_466),
    "G-v2-32k-f0": (560, 36_880_706),
    "G-v1-48k-f0": (619, 36_400_834),
    "D-v2": (165, 71_410_594),
    "D-v1": (129, 54_968_286),
}


def read_tsv(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = REF / f"{name}.tsv"
    if not path.is_file():
        pytest.fail(f"reference file {path} missing (tests/data/state-dicts)")
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def expected_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    parts = name.split("-")
    if parts[0] == "D":
        return list(discriminator_shapes(parts[1]).items())
    return list(generator_shapes(parts[1], parts[2], parts[3] == "f0").items())


@pytest.mark.parametrize("name", TSV_NAMES)
def test_keys_shapes_and_order_match_rvc(name: str) -> None:
    ref = read_tsv(name)
    ours = expected_shapes(name)
    assert [k for k, _ in ours] == [k for k, _ in ref], "key names or order differ"
    assert dict(ours) == dict(ref)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts_match_reference(name: str) -> None:
    n_tensors, n_params = PARAM_COUNTS[name]
    ours = expected_shapes(name)
    assert len(ours) == n_tensors
    assert sum(math.prod(s) for _, s in ours) == n_params


@pytest.fixture(scope="module")
def g_v2_40k() -> nn.Module:
    torch.manual_seed(0)
    return build_generator(get_config("v2", "40k"), "v2", True).eval()


def test_real_model_equals_tsv_and_counts(g_v2_40k: nn.Module) -> None:
    """The meta-device shapes above are the real model's: check one real build against the TSV."""
    sd = g_v2_40k.state_dict()
    ref = read_tsv("G-v2-40k-f0")
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == ref
    assert param_count(g_v2_40k) == 36_458_818
    assert param_count(sd) == 36_458_818
    assert all(v.dtype == torch.float32 for v in sd.values())


def _infer(model: nn.Module, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    data = torch.Generator().manual_seed(11)
    t = 3  # 1200 samples: the decoder costs ~1 GMAC per 1000 samples
    phone = torch.randn(1, t, 768, generator=data)
    pitch = torch.randint(1, 256, (1, t), generator=data)
    nsff0 = torch.full((1, t), 180.0)
    return model.infer(phone, torch.tensor([t]), pitch, nsff0, torch.tensor([0]), generator=gen)[0]


def _perturb(model: nn.Module) -> None:
    """Make every parameter non-trivial (post convs are zero-initialised; g = ||v|| at init)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))
            elif name.endswith("post.weight") or name.endswith("post.bias"):
                p.normal_(0.0, 0.01, generator=gen)


def test_round_trip_legacy_and_parametrization_names(g_v2_40k: nn.Module, tmp_path: Path) -> None:
    _perturb(g_v2_40k)
    ref = _infer(g_v2_40k)
    path = tmp_path / "G.pth"
    torch.save({"model": g_v2_40k.state_dict()}, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert any(k.endswith("weight_g") for k in loaded)

    torch.manual_seed(1)
    other = build_generator(get_config("v2", "40k"), "v2", True).eval()
    result = other.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(_infer(other), ref)

    # torch's parametrization spelling loads into the same model, strictly
    renamed = to_parametrization_names(loaded)
    assert any(".parametrizations.weight.original0" in k for k in renamed)
    assert not any(k.endswith("weight_g") for k in renamed)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(renamed, strict=True)
    assert torch.equal(_infer(other), ref)

    # folded weights (remove_weight_norm) give the same audio, and fold back on load
    other.remove_weight_norm()
    folded = other.state_dict()
    assert not any(k.endswith(("weight_g", "weight_v")) for k in folded)
    assert "dec.ups.0.weight" in folded and folded["dec.ups.0.weight"].shape == (512, 256, 16)
    assert torch.allclose(_infer(other), ref, atol=1e-5)
    other.load_state_dict(loaded, strict=True)  # g/v pair folded into .weight by the load hook
    assert torch.allclose(_infer(other), ref, atol=1e-5)
    g_v2_40k.load_state_dict(folded, strict=True)  # folded .weight split into g = ||w||, v = w
    assert torch.allclose(_infer(g_v2_40k), ref, atol=1e-5)


def test_discriminator_round_trip(tmp_path: Path) -> None:
    """A period discriminator saved with weight_g/weight_v reloads from either spelling (full D: TSV test)."""
    torch.manual_seed(0)
    d = DiscriminatorP(5)
    keys = [k.split(".", 2)[2] for k, _ in read_tsv("D-v1") if k.startswith("discriminators.3.")]
    assert list(d.state_dict()) == keys
    y = torch.randn(2, 1, 1001, generator=torch.Generator().manual_seed(2))
    ref_logits, ref_fmap = d(y)
    torch.save(d.state_dict(), tmp_path / "D.pth")
    torch.manual_seed(7)
    d2 = DiscriminatorP(5)
    d2.load_state_dict(to_parametrization_names(torch.load(tmp_path / "D.pth", weights_only=True)))
    logits, fmap = d2(y)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(fmap, ref_fmap))


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Conv1d(4, 6, 3), lambda: nn.ConvTranspose1d(6, 3, 4, 2), lambda: nn.Conv2d(2, 5, (5, 1))],
    ids=["conv1d", "convtranspose1d", "conv2d"],
)
def test_weight_norm_matches_torch(make) -> None:
    """Same g/v layout and effective weight as torch's weight_norm (dim 0; ConvTranspose: input axis)."""
    torch.manual_seed(0)
    ours = weight_norm(make())
    theirs = torch.nn.utils.parametrizations.weight_norm(make())
    with torch.no_grad():
        ours.weight_v.normal_()
        ours.weight_g.uniform_(0.5, 2.0)
        theirs.parametrizations.weight.original0.copy_(ours.weight_g)
        theirs.parametrizations.weight.original1.copy_(ours.weight_v)
        theirs.bias.copy_(ours.bias)
    assert ours.weight_g.shape == (ours.weight_v.shape[0],) + (1,) * (ours.weight_v.dim() - 1)
    assert torch.allclose(theirs.weight, compute_weight(ours.weight_g, ours.weight_v), atol=1e-6)
    x = torch.randn(2, ours.weight_v.shape[0 if isinstance(ours, nn.ConvTranspose1d) else 1],
                    *((9,) if not isinstance(ours, nn.Conv2d) else (9, 2)))
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    # state dict of torch's parametrization loads into ours
    fresh = weight_norm(make())
    fresh.load_state_dict(theirs.state_dict())
    assert torch.allclose(fresh(x), theirs(x), atol=1e-5)
    # the legacy implementation (deprecated; its warning silenced here) agrees on names and shapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = torch.nn.utils.weight_norm(make())
    assert {k: v.shape for k, v in legacy.state_dict().items()} == {
        k: v.shape for k, v in weight_norm(make()).state_dict().items()}
    remove_weight_norm(ours)
    assert set(ours.state_dict()) == {"weight", "bias"}
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_weight_norm_emits_no_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = weight_norm(nn.Conv1d(2, 2, 3))
        m(torch.randn(1, 2, 5))
        remove_weight_norm(m)


def test_module_can_be_deep_copied_after_training_forward() -> None:
    import copy

    m = weight_norm(nn.Conv1d(2, 3, 3))
    y = m(torch.randn(1, 2, 5))
    y.sum().backward()
    c = copy.deepcopy(m)
    assert torch.allclose(c(torch.ones(1, 2, 5)), m(torch.ones(1, 2, 5)))
    assert m.weight_g.grad is not None and m.weight_v.grad is not None
