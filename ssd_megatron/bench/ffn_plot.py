"""The figure of an `ssd-bench ffn` result: how much faster each expert backend runs one FFN layer than the dense
layer, per shape and activation, next to the issue's targets.

Two panels, forward + backward (training) and forward alone (inference, k = K). A bar is a backend's speedup
(dense time / backend time) measured in that run. The graphed ratio (CUDA-graph replays: GPU time without the
host's launch overhead) is used where the record has one. Bars without one are eager and drawn hatched. For
ReLU, a black tick marks the ratio against our fused dense FFN (`fused_dense_*`, the training step's): the
harder baseline. Dashed red segments are the targets (`TARGETS`). `ssd-bench ffn --out F.json` writes F.png;
`ssd-bench plot F.json ...` draws committed results again.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..errors import UserError
from ..plots import pyplot

# (panel, shape): the speedup the issue asks for
TARGETS = {("fwd_bwd", "base"): 2.5, ("fwd_bwd", "8b"): 3.0, ("fwd", "base"): 3.0}
PANELS = (("fwd_bwd", "forward + backward"), ("fwd", "forward (inference)"))


def speedup(rec: dict, panel: str) -> tuple[Optional[float], bool, Optional[float]]:
    """(speedup over the plain dense layer, whether it is graphed, speedup over our fused dense FFN or None) of one
    record for `panel` ("fwd" or "fwd_bwd"): the graphed ratios where the record has them, else the eager ones."""
    graphed = rec.get(f"speedup_{panel}_graph") is not None
    sfx = "_graph" if graphed else ""
    return rec.get(f"speedup_{panel}{sfx}"), graphed, rec.get(f"speedup_{panel}{sfx}_vs_fused_dense")


def _plotted(records: list) -> list:
    """The records drawn: those with realistic routing, or all where the run had none (`--routing uniform`)."""
    realistic = [r for r in records if r.get("routing", "realistic") == "realistic"]
    return realistic or records


def _groups(records: list) -> tuple[list, list]:
    """(shape, activation) groups and backends of `records`, in the order the run measured them."""
    groups, backends = [], []
    for r in records:
        g = (r["shape"], r["activation"])
        if g not in groups:
            groups.append(g)
        if r["backend"] not in backends:
            backends.append(r["backend"])
    return groups, backends


def plot_ffn(result: dict, path: str) -> None:
    """Write the figure of `result` (an `ssd-bench ffn` JSON, as a dict) to `path` (PNG)."""
    if not result.get("records"):
        raise UserError("the result has no records to plot (an `ssd-bench ffn` JSON has a 'records' list)")
    records = _plotted(result["records"])
    groups, backends = _groups(records)
    by = {(r["shape"], r["activation"], r["backend"]): r for r in records}
    plt = pyplot()
    wide = min(18.0, max(9.0, 2 * len(groups) * (0.6 + 0.35 * len(backends))))
    fig, axes = plt.subplots(1, 2, figsize=(wide, 4.2), sharey=True)
    width = 0.8 / len(backends)
    labelled = set()

    def once(name):  # one legend entry per name, in the figure's legend below the panels
        if name in labelled:
            return None
        labelled.add(name)
        return name

    for ax, (panel, title) in zip(axes, PANELS):
        for gi, (shape, act) in enumerate(groups):
            for b, backend in enumerate(backends):
                value, graphed, vs_fused = speedup(by.get((shape, act, backend), {}), panel)
                if value is None:
                    continue
                x = gi - 0.4 + width * (b + 0.5)
                ax.bar(x, value, width * 0.9, color=f"C{b % 10}", hatch=None if graphed else "//",
                       edgecolor="white" if graphed else "black", label=once(backend))
                top = max(value, vs_fused or 0.0)  # (the label above the fused-dense tick where that is higher)
                ax.annotate(f"{value:.2f}", (x, top), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
                if vs_fused is not None:
                    ax.plot([x - width * 0.4, x + width * 0.4], [vs_fused] * 2, color="black", lw=2,
                            label=once("vs our fused dense"))
            target = TARGETS.get((panel, shape))
            if target is not None:
                ax.plot([gi - 0.45, gi + 0.45], [target] * 2, "r--", lw=1.2, label=once("target"))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(groups)), [f"{s} {a}" for s, a in groups])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("speedup over the dense layer (x)")
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"One FFN layer, {result.get('tokens', '?')} tokens, {result.get('dtype', '')}: "
                 f"{result.get('gpu', '?')}, {result.get('date', '?')} (hatched: eager, else CUDA-graphed)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def png_path(json_path: str) -> str:
    """Where the figure of the result at `json_path` goes: the same name with .png."""
    root, ext = os.path.splitext(json_path)
    return (root if ext == ".json" else json_path) + ".png"


def main(argv: list) -> int:
    """`ssd-bench plot RESULT.json ...`: each result's figure beside it (or in --out-dir)."""
    import argparse

    ap = argparse.ArgumentParser(prog="ssd-bench plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="`ssd-bench ffn` JSON files")
    ap.add_argument("--out-dir", default=None, help="write the PNGs here instead of beside each JSON")
    args = ap.parse_args(argv)
    for path in args.results:
        try:
            with open(path) as fh:
                result = json.load(fh)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a JSON file ({exc})") from None
        if not isinstance(result, dict) or not result.get("records"):
            raise UserError(f"{path}: not an `ssd-bench ffn` result (a JSON object with a non-empty 'records' list)")
        out = png_path(path)
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            out = os.path.join(args.out_dir, os.path.basename(out))
        plot_ffn(result, out)
        print(f"plot: {out}")
    return 0
