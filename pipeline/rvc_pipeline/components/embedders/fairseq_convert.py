"""Read a fairseq-format HuBERT checkpoint (RVC's `hubert_base.pt`) without fairseq, as a conversion
to the Hugging Face `transformers.HubertModel` layout at load time (off the hot path).

The file is read through rvc_pipeline.safeload: the pickled `cfg` (omegaconf) and `task_state`
(fairseq Dictionary) load as inert data and any other Python object is refused, so neither fairseq nor
omegaconf is needed and nothing in the file can run. The `model` state dict is renamed to HF's keys
(training-only `mask_emb`/`label_embs_concat` dropped, fp16 tensors cast to fp32) and
the model config is read from `cfg.model` / `cfg.task.normalize`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import torch

from rvc_pipeline import safeload
from rvc_pipeline.components.embedders.base import EmbedderKind, register
from rvc_pipeline.components.embedders.hf_hubert import HFHubert, HubertWeights, hf_config, load_weights

# speed as hf_hubert (the same network after conversion)
CATALOG = {"fairseq_hubert": {"needs_gpu": True, "weights": ["hubert_base.pt"], "speed": 5.0, "rank": 0}}
HUBERT_BASE_CONV = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
TRAINING_ONLY_KEYS = ("label_embs_concat",)


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's `conv_feature_layers` string (lists of (dim, kernel, stride), + and *) safely."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)[:80]}")

    try:
        layers = ev(ast.parse(spec.strip(), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"conv_feature_layers: cannot parse {spec!r}: {e}") from None
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t) for t in layers
    ):
        raise ValueError(f"conv_feature_layers: expected a list of (dim, kernel, stride), got {spec!r}")
    return [tuple(t) for t in layers]


_PLAIN_BUDGET = 100_000  # objects; a pickle can share one object many times (memo), so count visits


def plain(obj: Any) -> Any:
    """Turn an unpickled config (inert omegaconf DictConfig/ListConfig/nodes, Namespace, dicts) into
    plain data. ValueError for a structure deeper than 50 or with more than 100000 objects."""
    budget = [_PLAIN_BUDGET]
    return _plain(obj, 0, budget)


def _plain(obj: Any, depth: int, budget: list[int]) -> Any:
    budget[0] -= 1
    if depth > 50 or budget[0] < 0:
        raise ValueError("the checkpoint's config is nested too deeply or is too large")
    if isinstance(obj, safeload.InertObject):
        return _plain_inert(obj, depth, budget)
    if isinstance(obj, dict):
        return {k: _plain(v, depth + 1, budget) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1, budget) for v in obj]
    return obj


def _plain_inert(obj: safeload.InertObject, depth: int, budget: list[int]) -> Any:
    st = obj.state
    if isinstance(st, tuple) and len(st) == 2 and (st[0] is None or isinstance(st[0], dict)):
        st = {**(st[0] or {}), **(st[1] if isinstance(st[1], dict) else {})}  # (__dict__, slots)
    if not isinstance(st, dict):
        return None
    if "_content" in st:  # omegaconf DictConfig / ListConfig
        return _plain(st["_content"], depth + 1, budget)
    if "_val" in st:  # omegaconf value node
        return _plain(st["_val"], depth + 1, budget)
    keep_private = obj.origin == "argparse.Namespace"
    return {k: _plain(v, depth + 1, budget) for k, v in st.items()
            if keep_private or not str(k).startswith("_")}


def _check_supported(model: dict[str, Any]) -> None:
    if (model.get("extractor_mode") or "default") != "default":
        raise ValueError(f"unsupported HuBERT extractor_mode {model.get('extractor_mode')!r} "
                         "(need 'default')")
    if model.get("layer_norm_first"):
        raise ValueError("unsupported HuBERT config: layer_norm_first=True (HuBERT-large style)")
    if str(model.get("activation_fn") or "gelu") != "gelu":
        raise ValueError(f"unsupported HuBERT activation_fn {model.get('activation_fn')!r}")


def config_from_fairseq(cfg: dict[str, Any] | None, final_dim: int) -> tuple[Any, bool]:
    """(transformers.HubertConfig, normalize) from a checkpoint's cfg (sections model/task) or flat
    args; HuBERT-base defaults where absent. `final_dim`: final_proj's size from the weights (0: none)."""
    cfg = cfg or {}
    model = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg
    task = cfg["task"] if isinstance(cfg.get("task"), dict) else cfg
    _check_supported(model)
    conv = model.get("conv_feature_layers")
    layers = parse_conv_layers(conv if isinstance(conv, str) else HUBERT_BASE_CONV)

    def get(key: str, default: int) -> int:
        v = model.get(key)
        return default if v is None else int(v)

    config = hf_config(
        conv_dim=[d for d, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers], conv_bias=bool(model.get("conv_bias") or False),
        hidden_size=get("encoder_embed_dim", 768), intermediate_size=get("encoder_ffn_embed_dim", 3072),
        num_attention_heads=get("encoder_attention_heads", 12), num_hidden_layers=get("encoder_layers", 12),
        num_conv_pos_embeddings=get("conv_pos", 128),
        num_conv_pos_embedding_groups=get("conv_pos_groups", 16),
        classifier_proj_size=final_dim or 256,
    )
    return config, bool(task.get("normalize") or False)


_RENAMES = (  # fairseq -> transformers.HubertModel, applied in order
    ("encoder.pos_conv.0.", "encoder.pos_conv_embed.conv."),
    (".self_attn_layer_norm.", ".layer_norm."),
    (".self_attn.", ".attention."),
    (".fc1.", ".feed_forward.intermediate_dense."),
    (".fc2.", ".feed_forward.output_dense."),
)


def hf_key(k: str) -> str | None:
    """The HF name of one fairseq key (None: training-only, dropped)."""
    if k in TRAINING_ONLY_KEYS:
        return None
    if k == "mask_emb":
        return "masked_spec_embed"
    if k.startswith("feature_extractor.conv_layers."):
        parts = k.split(".")  # feature_extractor.conv_layers.<i>.<0: conv | 2: GroupNorm>.<param>
        parts[3] = {"0": "conv", "2": "layer_norm"}.get(parts[3], parts[3])
        return ".".join(parts)
    if k.startswith(("layer_norm.", "post_extract_proj.")):
        head, rest = k.split(".", 1)
        return f"feature_projection.{'layer_norm' if head == 'layer_norm' else 'projection'}.{rest}"
    for a, b in _RENAMES:
        k = k.replace(a, b)
    return k


def convert(path: str | Path) -> HubertWeights:
    """A fairseq checkpoint as HF-layout weights (config, renamed fp32 state, normalize flag)."""
    state, cfg = load_fairseq_checkpoint(path)
    fp = state.get("final_proj.weight")
    try:
        config, normalize = config_from_fairseq(cfg, int(fp.shape[0]) if fp is not None else 0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    renamed = {nk: v for k, v in state.items() if (nk := hf_key(k)) is not None}
    return HubertWeights(config, renamed, normalize, str(path))


def load_fairseq_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a fairseq checkpoint (hubert_base.pt) without fairseq: (model state dict, plain cfg dict).

    Through rvc_pipeline.safeload: fairseq's and omegaconf's config classes load as inert data, any
    other Python object is refused (safeload.UnsafeFile, a ValueError too)."""
    p = Path(path)
    try:
        ckpt = safeload.load(p, what="HuBERT checkpoint")
    except safeload.UnreadableFile as e:
        raise ValueError(f"{p}: not a readable fairseq/torch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{p}: not a fairseq checkpoint (no 'model' state dict)")
    try:
        cfg = plain(ckpt.get("cfg"))
        if not isinstance(cfg, dict):
            args = plain(ckpt.get("args"))
            cfg = args if isinstance(args, dict) else {}
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None
    state = {k: v for k, v in ckpt["model"].items() if isinstance(v, torch.Tensor)}
    return state, cfg



def _load(path: Path | None, device: str, half: bool) -> HFHubert:
    if path is None:
        raise ValueError("a fairseq HuBERT needs a file")
    return load_weights(convert(path), device, half)


register(EmbedderKind("fairseq_hubert", accepts=Path.is_file, load=_load))
