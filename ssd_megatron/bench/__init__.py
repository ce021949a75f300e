"""`ssd-bench` sub-commands: `ffn` (one FFN layer: dense vs every expert backend), `step`, and `plot` (the figure of
an `ffn` result JSON)."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

from ..errors import UserError

SUBCOMMANDS = ("ffn", "step", "plot")


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ssd-bench {ffn,step,plot} [options]   (ssd-bench ffn --help)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        raise UserError(f"ssd-bench: unknown sub-command {cmd!r}; accepted: {', '.join(SUBCOMMANDS)}")
    if cmd == "ffn":
        from .ffn import main as ffn_main
        return ffn_main(rest)
    if cmd == "plot":
        from .ffn_plot import main as plot_main
        return plot_main(rest)
    try:
        step = importlib.import_module(".step", __name__)
    except ImportError:
        step = None
    if step is None or not hasattr(step, "main"):
        raise UserError("ssd-bench step: not yet implemented (the training-step benchmark is being written)")
    return step.main(rest)
