"""Console entry points: ssd-train, ssd-eval, ssd-data, ssd-bench, ssd-report (and `python -m ssd_megatron`).

Every entry point turns a `UserError` into one line `error: <message>` on stderr and exit status 2,
so a typo in a config or a missing file never shows a traceback. Other exceptions are bugs and keep
their traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

from .errors import UserError

TRAIN_USAGE = """usage: ssd-train [CONFIG.yaml] [section.key=value ...]

Train a model. CONFIG defaults to configs/gpt_tiny.yaml (the built-in default job). Any config key can
be overridden with a dotted assignment, e.g.  ssd-train configs/gpt_tiny.yaml method=dense train.max_steps=50
Multi-process: torchrun --nproc_per_node N -m ssd_megatron train CONFIG [overrides]
"""


def _run(fn: Callable[[], Optional[int]]) -> int:
    try:
        code = fn()
    except UserError as e:
        msg = " ".join(str(e).split("\n")).strip() or "invalid input"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def split_train_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """[CONFIG] [overrides...] -> (config or None, overrides). A first argument without '=' is the config."""
    config = None
    rest = list(argv)
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        config = rest.pop(0)
    for item in rest:
        if item.startswith("-") and "=" not in item:
            raise UserError(f"unknown option {item!r}; accepted: [CONFIG.yaml] [section.key=value ...], -h/--help")
    return config, rest


def _train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(TRAIN_USAGE)
        return 0
    from .config import load_config

    config, overrides = split_train_args(argv)
    cfg = load_config(config, overrides)
    from .train.loop import train

    summary = train(cfg)
    import json

    if summary.get("world_size", 1) == 1 or _rank() == 0:
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}), flush=True)
    return 0


def _rank() -> int:
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def train_main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return (_run(lambda: _train(argv)))


def _entry(module: str, argv: Optional[list[str]]) -> int:
    """Import `module` only when its command runs (fast --help, no torch import for typos) and call its main."""
    argv = sys.argv[1:] if argv is None else argv

    def go():
        import importlib

        return importlib.import_module(module, __package__).main(argv)
    return _run(go)


def eval_main(argv: Optional[list[str]] = None) -> int:
    return _entry(".infer.evaluate", argv)


def data_main(argv: Optional[list[str]] = None) -> int:
    return _entry(".data.cli", argv)


def bench_main(argv: Optional[list[str]] = None) -> int:
    return _entry(".bench", argv)


def report_main(argv: Optional[list[str]] = None) -> int:
    return _entry(".train.report", argv)


COMMANDS = {"train": train_main, "eval": eval_main, "data": data_main, "bench": bench_main, "report": report_main}


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m ssd_megatron {train,eval,data,bench,report} ...`; no sub-command = train."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m ssd_megatron {train,eval,data,bench,report} ...  (no sub-command: train)")
        return 0
    return train_main(argv)
