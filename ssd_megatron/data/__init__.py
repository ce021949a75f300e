"""Data pipeline: tokenizer, indexed datasets, preprocessing, objectives, sampling, default corpus.

(`preprocess` is not re-exported: the submodule of the same name would shadow it.) Names are resolved lazily, so ``ssd-data`` and the tokenizer don't pay for importing torch (only the
sampler needs it).
"""
import importlib

_EXPORTS = {
    "Tokenizer": "tokenizer", "SpecialIds": "tokenizer", "train_tokenizer": "tokenizer",
    "IndexedDataset": "indexed_dataset", "IndexedDatasetWriter": "indexed_dataset",
    "CausalLMDataset": "objectives", "MaskedLMDataset": "objectives", "SpanCorruptionDataset": "objectives",
    "build_objective": "objectives",
    "SampleOrder": "sampler", "DataIterator": "sampler", "ValidationIterator": "sampler",
    "ensure_default_corpus": "corpus",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
