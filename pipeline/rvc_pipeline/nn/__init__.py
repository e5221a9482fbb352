"""RVC's synthesizer and discriminators with state dicts identical to RVC's.

Public API:

* `config`: `RVCConfig`, `get_config(version, sample_rate)` (v2 40k uses v1/40k.json).
* `build_generator(cfg, version, f0, spk_embed_dim=109)` -> `SynthesizerTrn`:
  `forward(phone, phone_lengths, pitch, pitchf, spec, spec_lengths, sid)` (no f0: without pitch/pitchf)
  -> `(o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q))`;
  `infer(phone, phone_lengths, pitch, nsff0, sid)` (no f0: `(phone, phone_lengths, sid)`) -> like RVC
  the tuple `(audio [B, 1, T*hop], x_mask, (z, z_p, m_p, logs_p))`; `remove_weight_norm()`.
* `build_discriminator(version)` -> `forward(y, y_hat) -> (real_logits, fake_logits, real_fmaps,
  fake_fmaps)`.
* `describe_state_dict(sd)`, `check_compatible(sd, version, sr, f0, what)`, `param_count(model_or_sd)`.

Weight norm is stored as `weight_g`/`weight_v` (see `weightnorm`); `load_state_dict` also accepts
torch's `parametrizations.weight.original0/1` spelling and folded `.weight` tensors.
"""

from __future__ import annotations

from rvc_pipeline.nn.compat import (
    check_compatible,
    describe_state_dict,
    discriminator_shapes,
    generator_shapes,
    normalized_shapes,
    param_count,
)
from rvc_pipeline.nn.config import RVCConfig, get_config, normalize_sample_rate
from rvc_pipeline.nn.discriminator import (
    DiscriminatorP,
    DiscriminatorS,
    MultiPeriodDiscriminator,
    MultiPeriodDiscriminatorV2,
    build_discriminator,
)
from rvc_pipeline.nn.generator import Generator, GeneratorNSF, SineGen, SourceModuleHnNSF
from rvc_pipeline.nn.synthesizer import (
    SynthesizerTrn,
    SynthesizerTrnMs256NSFsid,
    SynthesizerTrnMs256NSFsid_nono,
    SynthesizerTrnMs768NSFsid,
    SynthesizerTrnMs768NSFsid_nono,
    build_generator,
    build_generator_from_list,
    constructor_args,
)
from rvc_pipeline.nn.weightnorm import remove_all_weight_norm, to_legacy_names, to_parametrization_names

__all__ = [
    "DiscriminatorP",
    "DiscriminatorS",
    "Generator",
    "GeneratorNSF",
    "MultiPeriodDiscriminator",
    "MultiPeriodDiscriminatorV2",
    "RVCConfig",
    "SineGen",
    "SourceModuleHnNSF",
    "SynthesizerTrn",
    "SynthesizerTrnMs256NSFsid",
    "SynthesizerTrnMs256NSFsid_nono",
    "SynthesizerTrnMs768NSFsid",
    "SynthesizerTrnMs768NSFsid_nono",
    "build_discriminator",
    "build_generator",
    "build_generator_from_list",
    "check_compatible",
    "constructor_args",
    "describe_state_dict",
    "discriminator_shapes",
    "generator_shapes",
    "get_config",
    "normalize_sample_rate",
    "normalized_shapes",
    "param_count",
    "remove_all_weight_norm",
    "to_legacy_names",
    "to_parametrization_names",
]
