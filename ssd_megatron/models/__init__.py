"""Model architectures as plain nn.Modules (parallelism is applied after construction).

`build_model(model_cfg, vocab_size)` builds by `model_cfg.arch`; `from_hf(hf_model)` converts a HF
transformers model (weights included). Every model: `model(**batch) -> logits [B, L, V]`,
`model.ffn_layers()` (all SwitchableFFNs, encoder then decoder), `model.transformer_layers()`.
"""
from __future__ import annotations

import importlib

from .blocks import Attention, RMSNorm, TransformerBlock, make_norm
from .gpt import GPT


_ARCHS = {"gpt": ("gpt", "GPT"), "bert": ("bert", "BERT"), "t5": ("t5", "T5"), "llama": ("llama", "Llama")}


def build_model(model_cfg, vocab_size: int = 0):
    """`vocab_size` is the final (already padded) vocabulary; 0 = take `model_cfg.vocab_size`."""
    vocab_size = vocab_size or model_cfg.vocab_size
    if vocab_size <= 0:
        raise ValueError("build_model: vocab_size must be given (model.vocab_size=0 means the caller pads "
                         "the tokenizer's size and passes it)")
    if model_cfg.arch not in _ARCHS:
        raise ValueError(f"model.arch {model_cfg.arch!r}; accepted: {', '.join(_ARCHS)}")
    module, cls = _ARCHS[model_cfg.arch]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(model_cfg, vocab_size)


def from_hf(hf_model):
    """Our equivalent of a HF GPT2LMHeadModel / BertForMaskedLM / T5ForConditionalGeneration /
    LlamaForCausalLM / PersimmonForCausalLM, with its weights. The config is at `model.cfg`."""
    from .hf_convert import convert

    return convert(hf_model)


__all__ = ["Attention", "GPT", "RMSNorm", "TransformerBlock", "build_model", "from_hf", "make_norm"]
