"""Load HF transformers models into ours: build a matching ModelConfig, then copy weights by name.

Only the HF *objects* are read (no downloads here); a caller may get one from `from_pretrained`.
Every converter fills every tensor of our state_dict except the FFN's `expert_perm` and `expert_major`
buffers (identity clustering, neuron order at load) and refuses HF options our models don't express,
rather than converting them wrongly.
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
    missing = [k for k in own if k not in tensors and not k.endswith(("expert_perm", "expert_major"))]
    _require(not missing, f"converter left parameters unset: {missing[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            _require(tuple(own[k].shape) == tuple(v.shape), f"{k}: shape {tuple(v.shape)} != ours {tuple(own[k].shape)}")
            own[k].copy_(v)  # state_dict() tensors alias the parameters; tied weights are written twice


def _dropout(*vals) -> float:
    v = [float(x) for x in vals if x is not None]
    return max(v) if v else 0.0


# --------------------------------------------------------------------------- GPT-2


def gpt2_config(c, tie: bool) -> ModelConfig:
    _require(not getattr(c, "scale_attn_by_inverse_layer_idx", False), "gpt2 scale_attn_by_inverse_layer_idx")
    _require(getattr(c, "scale_attn_weights", True), "gpt2 scale_attn_weights=False")
    _require(not getattr(c, "add_cross_attention", False), "gpt2 add_cross_attention")
    return ModelConfig(
        arch="gpt", n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_ff=c.n_inner or 4 * c.n_embd,
        activation=_act(c.activation_function, "gpt2"), max_seq_len=c.n_positions, vocab_size=c.vocab_size,
        dropout=_dropout(c.resid_pdrop, c.embd_pdrop, c.attn_pdrop), bias=True, norm="layernorm",
        norm_eps=c.layer_norm_epsilon, tie_embeddings=tie,
        init_std=c.initializer_range)


def _gpt2(hf):
    return gpt2_config(hf.config, _same_tensor(hf.lm_head.weight, hf.transformer.wte.weight))


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


def _same_tensor(a, b) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _copy_norm(out: dict, sd: dict, ours: str, theirs: str) -> None:
    out[ours + ".weight"] = sd[theirs + ".weight"]
    if theirs + ".bias" in sd:
        out[ours + ".bias"] = sd[theirs + ".bias"]


def _copy_linear(out: dict, sd: dict, ours: str, theirs: str) -> None:
    _copy_norm(out, sd, ours, theirs)  # same two names: weight (and bias if present)


# --------------------------------------------------------------------------- BERT


def bert_config(c, tie: bool) -> ModelConfig:
    _require(getattr(c, "position_embedding_type", "absolute") == "absolute", "bert position_embedding_type")
    _require(not getattr(c, "is_decoder", False), "bert is_decoder")
    return ModelConfig(
        arch="bert", n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        d_ff=c.intermediate_size, activation=_act(c.hidden_act, "bert"), max_seq_len=c.max_position_embeddings,
        vocab_size=c.vocab_size, dropout=_dropout(c.hidden_dropout_prob, c.attention_probs_dropout_prob),
        bias=True, norm="layernorm", norm_eps=c.layer_norm_eps, norm_position="post", tie_embeddings=tie,
        init_std=c.initializer_range)


def bert_tensors(hf, cfg: ModelConfig) -> dict:
    sd = hf.state_dict()
    e = "bert.embeddings."
    # We keep BERT's 2 segment rows (only segment 0 is fed by our MLM data).
    types = sd[e + "token_type_embeddings.weight"][:2]
    if types.shape[0] < 2:
        types = torch.cat([types, torch.zeros_like(types[:1])])
    out = {"tok_emb.weight": sd[e + "word_embeddings.weight"], "pos_emb.weight": sd[e + "position_embeddings.weight"],
           "type_emb.weight": types}
    _copy_norm(out, sd, "emb_norm", e + "LayerNorm")
    for i in range(cfg.n_layers):
        h, o = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for ours, theirs in (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                             ("attn.v_proj", "attention.self.value"), ("attn.o_proj", "attention.output.dense"),
                             ("norm1", "attention.output.LayerNorm"), ("ffn.w_in", "intermediate.dense"),
                             ("ffn.w_out", "output.dense"), ("norm2", "output.LayerNorm")):
            _copy_linear(out, sd, o + ours, h + theirs)
    p = "cls.predictions."
    _copy_linear(out, sd, "head_dense", p + "transform.dense")
    _copy_norm(out, sd, "head_norm", p + "transform.LayerNorm")
    out["lm_head.weight"] = sd[p + "decoder.weight"]
    out["lm_head.bias"] = sd.get(p + "decoder.bias", sd.get(p + "bias"))
    return out


def _bert(hf):
    tie = _same_tensor(hf.cls.predictions.decoder.weight, hf.bert.embeddings.word_embeddings.weight)
    return bert_config(hf.config, tie)


# --------------------------------------------------------------------------- T5


def _t5_activation(c) -> str:
    act = getattr(c, "dense_act_fn", c.feed_forward_proj.split("-")[-1])
    if not getattr(c, "is_gated_act", c.feed_forward_proj.startswith("gated-")):
        return _act(act, "t5")
    gated = {"relu": "reglu", "silu": "swiglu", "gelu": "geglu"}
    _require(act in gated, f"t5 feed_forward_proj={c.feed_forward_proj!r} (gated {act}); supported gated: "
             "gated-relu, gated-silu, gated-gelu with exact gelu")
    return gated[act]


def _t5_head(hf):
    """(tie, scale): HF ties and/or rescales by d_model^-0.5 independently (v1.1 doesn't scale)."""
    c = hf.config
    scale = bool(getattr(c, "scale_decoder_outputs", getattr(c, "tie_word_embeddings", True)))
    return _same_tensor(hf.lm_head.weight, hf.shared.weight), scale


def _t5(hf):
    c = hf.config
    _require(c.d_kv * c.num_heads == c.d_model, f"t5 d_kv*num_heads ({c.d_kv}*{c.num_heads}) != d_model ({c.d_model})")
    tie, scale = _t5_head(hf)
    return ModelConfig(
        arch="t5", n_layers=c.num_layers, n_decoder_layers=c.num_decoder_layers or c.num_layers, d_model=c.d_model,
        n_heads=c.num_heads, d_ff=c.d_ff, activation=_t5_activation(c), max_seq_len=512, vocab_size=c.vocab_size,
        dropout=float(c.dropout_rate), bias=False, norm="rmsnorm", norm_eps=c.layer_norm_epsilon,
        tie_embeddings=tie and scale, relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance)


def t5_tensors(hf, cfg: ModelConfig) -> dict:
    sd = hf.state_dict()
    tie, scale = _t5_head(hf)
    head = sd["lm_head.weight"]
    if not (tie and scale) and scale:
        head = head * cfg.d_model ** -0.5  # fold HF's output rescale into an untied head
    out = {"tok_emb.weight": sd["shared.weight"], "lm_head.weight": head}
    for stack in ("encoder", "decoder"):
        n = cfg.n_layers if stack == "encoder" else cfg.n_decoder_layers
        out[f"{stack}.relative_bias.embedding.weight"] = sd[
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        _copy_norm(out, sd, f"{stack}.final_norm", f"{stack}.final_layer_norm")
        for i in range(n):
            h, o = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
            parts = [("attn", "norm1", "0.SelfAttention", "0.layer_norm")]
            if stack == "decoder":
                parts.append(("cross_attn", "norm_cross", "1.EncDecAttention", "1.layer_norm"))
            for attn, norm, theirs, their_norm in parts:
                for x in "qkvo":
                    out[o + f"{attn}.{x}_proj.weight"] = sd[h + f"{theirs}.{x}.weight"]
                _copy_norm(out, sd, o + norm, h + their_norm)
            f = h + ("2" if stack == "decoder" else "1")
            ff = f + ".DenseReluDense."
            if ff + "wi.weight" in sd:
                out[o + "ffn.w_in.weight"] = sd[ff + "wi.weight"]
            else:  # gated: our GLU layout is [gate rows; up rows]
                out[o + "ffn.w_in.weight"] = torch.cat([sd[ff + "wi_0.weight"], sd[ff + "wi_1.weight"]])
            out[o + "ffn.w_out.weight"] = sd[ff + "wo.weight"]
            _copy_norm(out, sd, o + "norm2", f + ".layer_norm")
    return out


# --------------------------------------------------------------------------- Llama / Persimmon


def _rope_theta(c) -> float:
    rp = getattr(c, "rope_parameters", None) or {}
    _require(rp.get("rope_type", "default") == "default", f"rope_type {rp.get('rope_type')!r} (only default RoPE)")
    return float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _llama(hf):
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    _require(head_dim * c.num_attention_heads == c.hidden_size, "llama head_dim * heads != hidden_size")
    _require(bool(c.attention_bias) == bool(getattr(c, "mlp_bias", False)), "llama attention_bias != mlp_bias")
    _require(c.hidden_act == "silu", f"llama hidden_act {c.hidden_act!r} (only silu -> swiglu)")
    kv = c.num_key_value_heads or c.num_attention_heads
    return ModelConfig(
        arch="llama", n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        n_kv_heads=0 if kv == c.num_attention_heads else kv, d_ff=c.intermediate_size, activation="swiglu",
        max_seq_len=c.max_position_embeddings, vocab_size=c.vocab_size, dropout=float(c.attention_dropout),
        bias=bool(c.attention_bias), norm="rmsnorm", norm_eps=c.rms_norm_eps,
        tie_embeddings=_same_tensor(hf.lm_head.weight, hf.model.embed_tokens.weight),
        init_std=c.initializer_range, rope_theta=_rope_theta(c))


def llama_tensors(hf, cfg: ModelConfig) -> dict:
    sd = hf.state_dict()
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "lm_head.weight": sd["lm_head.weight"]}
    _copy_norm(out, sd, "final_norm", "model.norm")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        for x in "qkvo":
            _copy_linear(out, sd, o + f"attn.{x}_proj", h + f"self_attn.{x}_proj")
        _copy_norm(out, sd, o + "norm1", h + "input_layernorm")
        _copy_norm(out, sd, o + "norm2", h + "post_attention_layernorm")
        for k in ("weight", "bias"):
            if h + f"mlp.gate_proj.{k}" in sd:
                out[o + f"ffn.w_in.{k}"] = torch.cat([sd[h + f"mlp.gate_proj.{k}"], sd[h + f"mlp.up_proj.{k}"]])
        _copy_linear(out, sd, o + "ffn.w_out", h + "mlp.down_proj")
    return out


def _persimmon(hf):
    c = hf.config
    rp = getattr(c, "rope_parameters", None) or {}
    prf = float(rp.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
    _require(prf == 1.0, f"persimmon partial_rotary_factor={prf} (our RoPE rotates the whole head)")
    return ModelConfig(
        arch="llama", n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
        d_ff=c.intermediate_size, activation=_act(c.hidden_act, "persimmon"), max_seq_len=c.max_position_embeddings,
        vocab_size=c.vocab_size, dropout=_dropout(c.hidden_dropout, c.attention_dropout), bias=True,
        norm="layernorm", norm_eps=c.layer_norm_eps, qk_norm=bool(c.qk_layernorm),
        tie_embeddings=_same_tensor(hf.lm_head.weight, hf.model.embed_tokens.weight),
        init_std=c.initializer_range, rope_theta=_rope_theta(c))


def persimmon_tensors(hf, cfg: ModelConfig) -> dict:
    sd = hf.state_dict()
    H, d = cfg.n_heads, cfg.d_model
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "lm_head.weight": sd["lm_head.weight"]}
    _copy_norm(out, sd, "final_norm", "model.final_layernorm")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        # Fused qkv is interleaved per head: output rows are [head][q|k|v][head_dim].
        w = sd[h + "self_attn.query_key_value.weight"].view(H, 3, d // H, d)
        b = sd[h + "self_attn.query_key_value.bias"].view(H, 3, d // H)
        for j, x in enumerate("qkv"):
            out[o + f"attn.{x}_proj.weight"] = w[:, j].reshape(d, d)
            out[o + f"attn.{x}_proj.bias"] = b[:, j].reshape(d)
        _copy_linear(out, sd, o + "attn.o_proj", h + "self_attn.dense")
        if cfg.qk_norm:
            _copy_norm(out, sd, o + "attn.q_norm", h + "self_attn.q_layernorm")
            _copy_norm(out, sd, o + "attn.k_norm", h + "self_attn.k_layernorm")
        _copy_norm(out, sd, o + "norm1", h + "input_layernorm")
        _copy_norm(out, sd, o + "norm2", h + "post_attention_layernorm")
        _copy_linear(out, sd, o + "ffn.w_in", h + "mlp.dense_h_to_4h")
        _copy_linear(out, sd, o + "ffn.w_out", h + "mlp.dense_4h_to_h")
    return out


# --------------------------------------------------------------------------- dispatch


def convert(hf_model):
    """HF model object -> our model (same dtype as the HF weights, eval mode if HF's was)."""
    from . import build_model

    kind = type(hf_model).__name__
    table = {"GPT2LMHeadModel": (_gpt2, gpt2_tensors),
             "BertForMaskedLM": (_bert, bert_tensors),
             "T5ForConditionalGeneration": (_t5, t5_tensors),
             "LlamaForCausalLM": (_llama, llama_tensors),
             "PersimmonForCausalLM": (_persimmon, persimmon_tensors)}
    if kind not in table:
        raise ValueError(f"from_hf: {kind} is not supported; supported: {', '.join(table)}")
    make_cfg, make_tensors = table[kind]
    cfg = make_cfg(hf_model)
    model = build_model(cfg, cfg.vocab_size)
    dtype = next(hf_model.parameters()).dtype
    model.to(dtype)
    _load(model, make_tensors(hf_model, cfg))
    model.train(hf_model.training)
    return model
