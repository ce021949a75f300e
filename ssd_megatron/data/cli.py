"""``ssd-data``: train a tokenizer, preprocess corpora into indexed datasets, build the default corpus.

User mistakes (missing files, bad JSON lines, corrupt models) print one ``error:`` line and exit 2,
never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from ssd_megatron.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssd-data", description="Tokenizer training and data preprocessing.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train-tokenizer", help="train a sentencepiece model with every objective's special tokens")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or .jsonl[.gz] files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="lines sampled for training (caps time and memory)")
    t.add_argument("--character-coverage", type=float, default=0.9999)

    pp = sub.add_parser("preprocess", help="tokenise corpora into PREFIX_{train,valid}.{bin,idx}")
    pp.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="text files, or JSON lines (.jsonl, .jsonl.gz, .json.gz) with a \"text\" field")
    pp.add_argument("--tokenizer", required=True, metavar="MODEL", help="sentencepiece .model file")
    pp.add_argument("--output", required=True, metavar="PREFIX")
    pp.add_argument("--workers", type=int, default=1)
    pp.add_argument("--valid-fraction", type=float, default=0.01)
    pp.add_argument("--append-eos", action="store_true", help="end every document with EOS")
    pp.add_argument("--doc-per", default="file", choices=["file", "line", "blank-line"],
                    help="document boundaries in plain-text files (JSON lines: always one per line)")
    pp.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("build-default", help="build (or find cached) the embedded Python-stdlib corpus")
    b.add_argument("--cache-dir", default=None, help="default: $SSD_MEGATRON_CACHE or ~/.cache/ssd_megatron")
    b.add_argument("--vocab-size", type=int, default=None)
    b.add_argument("--max-files", type=int, default=None)
    b.add_argument("--workers", type=int, default=None)
    return p


def _run(args: argparse.Namespace) -> None:
    if args.command == "train-tokenizer":
        from ssd_megatron.data.tokenizer import Tokenizer, train_tokenizer

        path = train_tokenizer(args.input, args.vocab_size, args.output, model_type=args.model_type,
                               input_sentence_size=args.input_sentence_size,
                               character_coverage=args.character_coverage)
        print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")
    elif args.command == "preprocess":
        from ssd_megatron.data.preprocess import preprocess

        preprocess(args.input, args.tokenizer, args.output, workers=args.workers,
                   valid_fraction=args.valid_fraction, append_eos=args.append_eos, doc_per=args.doc_per,
                   progress=False if args.no_progress else None)
    elif args.command == "build-default":
        from ssd_megatron.data.corpus import DEFAULT_VOCAB_SIZE, corpus_info, ensure_default_corpus

        prefix, tok = ensure_default_corpus(args.cache_dir, max_files=args.max_files,
                                            vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE, workers=args.workers)
        info = corpus_info(prefix)
        print(f"default corpus: {prefix}_{{train,valid}} ({info['documents']} docs, {info['bytes'] / 1e6:.1f} MB, "
              f"{info['train_tokens']} train / {info['valid_tokens']} valid tokens), tokenizer {tok}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
