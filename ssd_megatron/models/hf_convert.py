"""Load HF transformers models into ours: build a matching ModelConfig, then copy weights by name.

Only the HF *objects* are read (no downloads here); a caller may get one from `from_pretrained`.
Every converter fills every tensor of our state_dict except the FFN's `expert_perm` buffer (identity
at load) and refuses HF options our models don't express, rather than converting them wrongly.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig

# HF activation names -> ours. gelu_new / gelu_pytorch_tanh / gelu_fast are the same tanh formula.
_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "relu2": "squared_relu"}


def _act(name: str, what: str) -> str:
    if name not in _ACT:
        raise ValueError(f"{what}: activation {name!r} is not supported; supported: {', '.join(_ACT)}")
    return _ACT[name]


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"cannot convert: {msg}")


def _load(model, tensors: dict) -> None:
    """Copy `tensors` (our names) into `model`; every parameter must be covered, shapes must match."""
    own = model.state_dict()
    unknown = set(tensors) - set(own)
    _require(not unknown, f"converter produced unknown keys {sorted(unknown)[:5]}")
    missing = [k for k in own if k not in tensors and not k.endswith("expert_perm")]
    _require(not missing, f"converter left parameters unset: {missing[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            _require(tuple(own[k].shape) == tuple(v.shape), f"{k}: shape {tuple(v.shape)} != ours {tuple(own[k].shape)}")
            own[k].copy_(v)  # state_dict() tensors alias the parameters; tied weights are written twice


def _dropout(*vals) -> float:
    v = [float(x) for x in vals if x is not None]
    return max(v) if v else 0.0


# --------------------------------------------------------------------------- GPT-2


def gpt2_config(c) -> ModelConfig:
    _require(not getattr(c, "scale_attn_by_inverse_layer_idx", False), "gpt2 scale_attn_by_inverse_layer_idx")
    _require(getattr(c, "scale_attn_weights", True), "gpt2 scale_attn_weights=False")
    _require(not getattr(c, "add_cross_attention", False), "gpt2 add_cross_attention")
    return ModelConfig(
        arch="gpt", n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_ff=c.n_inner or 4 * c.n_embd,
        activation=_act(c.activation_function, "gpt2"), max_seq_len=c.n_positions, vocab_size=c.vocab_size,
        dropout=_dropout(c.resid_pdrop, c.embd_pdrop, c.attn_pdrop), bias=True, norm="layernorm",
        norm_eps=c.layer_norm_epsilon, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        init_std=c.initializer_range)


def gpt2_tensors(hf, cfg: ModelConfig) -> dict:
    sd = hf.state_dict()
    d = cfg.d_model
    out = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "final_norm.weight": sd["transformer.ln_f.weight"], "final_norm.bias": sd["transformer.ln_f.bias"],
           "lm_head.weight": sd.get("lm_head.weight", sd["transformer.wte.weight"])}
    for i in range(cfg.n_layers):
        h, o = f"transformer.h.{i}.", f"layers.{i}."
        # GPT-2's Conv1D stores weights as [in, out]: transpose to nn.Linear's [out, in]. c_attn is
        # q, k, v fused along the output dim.
        w_qkv, b_qkv = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
        for j, name in enumerate(("q", "k", "v")):
            out[o + f"attn.{name}_proj.weight"] = w_qkv[j * d:(j + 1) * d]
            out[o + f"attn.{name}_proj.bias"] = b_qkv[j * d:(j + 1) * d]
        out[o + "attn.o_proj.weight"] = sd[h + "attn.c_proj.weight"].t()
        out[o + "attn.o_proj.bias"] = sd[h + "attn.c_proj.bias"]
        out[o + "ffn.w_in.weight"] = sd[h + "mlp.c_fc.weight"].t()
        out[o + "ffn.w_in.bias"] = sd[h + "mlp.c_fc.bias"]
        out[o + "ffn.w_out.weight"] = sd[h + "mlp.c_proj.weight"].t()
        out[o + "ffn.w_out.bias"] = sd[h + "mlp.c_proj.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[o + f"{ours}.weight"] = sd[h + f"{theirs}.weight"]
            out[o + f"{ours}.bias"] = sd[h + f"{theirs}.bias"]
    return out


# --------------------------------------------------------------------------- dispatch


def convert(hf_model):
    """HF model object -> our model (same dtype as the HF weights, eval mode if HF's was)."""
    from . import build_model

    kind = type(hf_model).__name__
    table = {"GPT2LMHeadModel": (gpt2_config, gpt2_tensors)}
    if kind not in table:
        raise ValueError(f"from_hf: {kind} is not supported; supported: {', '.join(table)}")
    make_cfg, make_tensors = table[kind]
    cfg = make_cfg(hf_model.config)
    model = build_model(cfg, cfg.vocab_size)
    dtype = next(hf_model.parameters()).dtype
    model.to(dtype)
    _load(model, make_tensors(hf_model, cfg))
    model.train(hf_model.training)
    return model
