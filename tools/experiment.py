#!/usr/bin/env python3
"""The paper's comparison in miniature: Dense, SSD, SMoE, MoE-Dropout and PLD on one GPT, same tokens.

    python tools/experiment.py --tiny                      # CPU, a few minutes, proves the pipeline
    python tools/experiment.py                             # GPU preset (~2 min per method on an H100)
    python tools/experiment.py --stages data dense ssd     # a subset (the device tool caps a command at 10 min)
    python tools/experiment.py --stages smoe moe_dropout pld report

Stages (in this order; each is skipped when its output already exists, unless --force):
- data: a real-text corpus made of the Python sources installed on this machine (site-packages +
  stdlib), deduplicated, in a deterministic pseudo-random file order, capped at --max-mb; then
  `ssd-data train-tokenizer` and `ssd-data preprocess` (our data tools) into WORK/data/python_*.
- one stage per method: `ssd-train` (python -m ssd_megatron train) in a subprocess with a config
  written to WORK/configs/<method>.yaml; every method sees the same data, seed, batches and steps.
  Then, where `ssd-eval` offers `--sweep-k`, the k sweep of Figure 4a for ssd / moe_dropout / smoe.
- report: `ssd_megatron.report.compare` (Figure 3, Figure 4a, the Table-4-like table) into --out,
  plus results.json (each method's final ppl, training FLOPs and time, and their ratios to dense).

Scaling of the paper's settings to a short run (documented in docs/baselines.md):
- SSD: N, K keep the paper's expert width (192 neurons) and K/N = 6/32; the monitor interval is the
  paper's share of the run (3 000 of 200 000 steps = 1.5 %), at least 5 steps; τ, r, l as the paper.
- MoE-Dropout: same N as SSD, K from the same K/N ratio (6/32) to N over the whole run.
- SMoE: N=3, K=2 as the paper (d_ff is chosen divisible by 3).
- PLD: θ̄ = 0.5; γ = 200 / steps, i.e. θ reaches θ̄ after the same share of the run as the paper's
  γ = 0.001 over 200 000 steps ("the dropout rate rises quickly at the beginning", appendix A).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dense", "ssd", "smoe", "moe_dropout", "pld")
# Training order: the baseline first, the (expectedly) slowest last, so a deadline cuts the least.
RUN_ORDER = ("dense", "ssd", "pld", "smoe", "moe_dropout")
STAGES = ("data",) + METHODS + ("report",)

PRESETS = {
    # One H100 (bf16): 6 x 384, d_ff 8 x 384, seq 512, 32k tokens / step, 49M tokens per method.
    "gpu": dict(n_layers=6, d_model=384, n_heads=6, d_ff=3072, seq_len=512, global_batch=64, micro_batch=64,
                steps=1500, lr=1.5e-3, warmup=75, eval_points=10, eval_batches=8, vocab=8192, max_mb=200,
                sentences=400_000, ssd_experts=16, ssd_k=3, device="auto", valid_fraction=0.005),
    # CPU: proves the pipeline end to end in a few minutes.
    "tiny": dict(n_layers=2, d_model=64, n_heads=2, d_ff=384, seq_len=64, global_batch=8, micro_batch=8,
                 steps=60, lr=3e-3, warmup=6, eval_points=3, eval_batches=2, vocab=1024, max_mb=3,
                 sentences=50_000, ssd_experts=8, ssd_k=2, device="cpu", stdlib_only=True,
                 valid_fraction=0.05, threads=1),
}


def log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data


def python_source_files(stdlib_only: bool = False) -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if not stdlib_only:
        for key in ("purelib", "platlib"):
            roots.append(Path(sysconfig.get_paths()[key]))
        try:
            import site

            roots += [Path(p) for p in site.getsitepackages()]
        except AttributeError:
            pass
    seen, files = set(), []
    for root in roots:
        root = root.resolve()
        if not root.is_dir() or root in seen:
            continue
        seen.add(root)
        for p in root.rglob("*.py"):
            if stdlib_only and "site-packages" in p.parts:
                continue
            files.append(p)
    # Deterministic pseudo-random order (by path hash), so a size cap samples every package.
    files = sorted(set(files), key=lambda p: hashlib.sha1(str(p).encode()).hexdigest())
    return files


def build_corpus(work: Path, p: dict, force: bool, workers: int) -> tuple[str, str]:
    ddir = work / "data"
    prefix, tok_prefix = ddir / "python", ddir / "tokenizer"
    done = ddir / "DONE.json"
    if done.is_file() and not force:
        log(f"data: cached ({json.loads(done.read_text())})")
        return str(prefix), str(tok_prefix) + ".model"
    if ddir.exists():
        shutil.rmtree(ddir)
    ddir.mkdir(parents=True)
    cap = int(p["max_mb"] * 1e6)
    files = python_source_files(stdlib_only=p.get("stdlib_only", False))
    jsonl = ddir / "corpus.jsonl"
    hashes, n_docs, n_bytes = set(), 0, 0
    with open(jsonl, "w", encoding="utf-8") as f:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if len(text) < 200 or len(text) > 2_000_000:
                continue
            h = hashlib.sha1(text.encode()).digest()
            if h in hashes:
                continue
            hashes.add(h)
            f.write(json.dumps({"text": text}) + "\n")
            n_docs += 1
            n_bytes += len(text)
            if n_bytes >= cap:
                break
    log(f"data: {n_docs} Python files, {n_bytes / 1e6:.1f} MB from {len(files)} candidates")
    data_cli = [sys.executable, "-m", "ssd_megatron", "data"]
    run([*data_cli, "train-tokenizer", "--input", str(jsonl), "--vocab-size", str(p["vocab"]),
         "--output", str(tok_prefix), "--input-sentence-size", str(p["sentences"])])
    run([*data_cli, "preprocess", "--input", str(jsonl), "--tokenizer", str(tok_prefix) + ".model",
         "--output", str(prefix), "--workers", str(workers), "--valid-fraction", str(p["valid_fraction"]), "--append-eos",
         "--no-progress"])
    jsonl.unlink()  # the indexed dataset is what training reads
    done.write_text(json.dumps({"documents": n_docs, "bytes": n_bytes, "vocab": p["vocab"]}))
    return str(prefix), str(tok_prefix) + ".model"


THREADS: dict = {}


def run(cmd: list[str], logfile: Path | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **THREADS)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if logfile is None:
        return subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=timeout)
    with open(logfile, "w") as f:
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"stopped after {timeout:.0f}s (deadline); log {logfile}") from None
    if proc.returncode:
        tail = logfile.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with status {proc.returncode}; log {logfile}:\n{tail}")
    return proc


class Deadline:
    """--deadline-minutes: stop starting (and cut) runs so the report still gets written in time."""

    REPORT_RESERVE_S = 25.0

    def __init__(self, minutes: float | None):
        self.t0 = time.perf_counter()
        self.total = None if not minutes else minutes * 60.0

    def left(self) -> float | None:
        if self.total is None:
            return None
        return self.total - (time.perf_counter() - self.t0) - self.REPORT_RESERVE_S


# --------------------------------------------------------------------------- configs


def method_config(method: str, p: dict, prefix: str, tokenizer: str, run_dir: Path, args) -> dict:
    steps = p["steps"]
    eval_interval = max(1, steps // p["eval_points"])
    n, k = p["ssd_experts"], p["ssd_k"]
    cfg = {
        "name": f"experiment_{method}",
        "method": method,
        "model": {"arch": "gpt", "n_layers": p["n_layers"], "d_model": p["d_model"], "n_heads": p["n_heads"],
                  "d_ff": p["d_ff"], "activation": "relu", "max_seq_len": p["seq_len"], "vocab_multiple": 128,
                  "norm_position": "pre", "dropout": 0.0},
        "data": {"path": prefix, "tokenizer": tokenizer, "seq_len": p["seq_len"], "seed": 1234},
        "train": {"max_steps": steps, "global_batch_size": p["global_batch"], "micro_batch_size": p["micro_batch"],
                  "output_dir": str(run_dir), "seed": 1234, "device": args.device or p["device"],
                  "precision": "auto", "compile": bool(args.compile), "grad_clip": 1.0,
                  "cuda_graph": "auto" if args.cuda_graph else False,
                  "eval_interval": eval_interval, "eval_batches": p["eval_batches"], "log_interval": 1},
        "optim": {**schedule_config(p), "warmup_steps": p["warmup"], "weight_decay": 0.01, "beta1": 0.9,
                  "beta2": 0.95},
        "checkpoint": {"interval": steps, "keep_last": 1, "resume": "none"},
        "logging": {"tensorboard": False, "progress": False, "report": True, "wandb": "disabled"},
    }
    if method == "ssd":
        cfg["ssd"] = {"num_experts": n, "top_k": k, "threshold": 0.9,
                      "monitor_interval": max(5, round(steps * 3000 / 200_000)), "sparse_ratio": 0.5,
                      "final_dense_ratio": 0.1, "backend": args.backend}
    elif method == "moe_dropout":
        cfg["moe_dropout"] = {"num_experts": n, "k_start": max(1, round(n * 6 / 32)), "k_end": 0}
        cfg["ssd"] = {"backend": args.backend}
    elif method == "smoe":
        cfg["smoe"] = {"num_experts": 3, "top_k": 2, "aux_loss_coef": 0.01, "z_loss_coef": 0.0}
        cfg["ssd"] = {"backend": args.backend}
    elif method == "pld":
        cfg["pld"] = {"theta_bar": 0.5, "gamma": 200.0 / steps}
    return cfg


def schedule_config(p: dict) -> dict:
    """Cosine to lr/10, or the paper's Noam (appendix A) scaled so that its peak (at the end of warm-up)
    is the same lr: Noam's lr(n) = scale * d^-0.5 * min(n^-0.5, n * w^-1.5) peaks at scale / sqrt(d * w)."""
    if p.get("schedule", "cosine") == "noam":
        return {"schedule": "noam", "lr": p["lr"] * (p["d_model"] * p["warmup"]) ** 0.5}
    return {"schedule": "cosine", "lr": p["lr"], "min_lr": p["lr"] / 10}


def train_method(method: str, work: Path, p: dict, data: tuple[str, str], args, deadline: Deadline) -> dict:
    import yaml

    run_dir = work / "runs" / method
    summary_file = run_dir / "summary.json"
    if summary_file.is_file() and not args.force:
        log(f"{method}: done before ({summary_file})")
        return json.loads(summary_file.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path = work / "configs" / f"{method}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(method_config(method, p, *data, run_dir, args), sort_keys=False))
    left = deadline.left()
    if left is not None and left < 30:
        raise TimeoutError(f"not started: {max(left, 0):.0f}s left before the deadline")
    log(f"{method}: training {p['steps']} steps ({cfg_path})" + ("" if left is None else f", {left:.0f}s left"))
    t0 = time.perf_counter()
    logfile = work / "logs" / f"{method}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "ssd_megatron", "train", str(cfg_path)], logfile, timeout=left)
    wall = time.perf_counter() - t0
    summary = {}
    for line in reversed(logfile.read_text().splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
                break
            except ValueError:
                continue
    summary["process_wall_s"] = wall
    if method in ("dense", "ssd", "moe_dropout", "smoe") and not args.no_sweep:
        # dense: the "MoEfied" dense model of Fig. 4a, clustered with SSD's N
        summary["sweep"] = sweep_k(method, run_dir, work, deadline, ["--num-experts", str(p["ssd_experts"])]
                                   if method == "dense" else [])
    summary_file.write_text(json.dumps(summary, indent=1))
    log(f"{method}: valid ppl {summary.get('valid_ppl', float('nan')):.3f}, {summary.get('flops', 0):.3e} FLOPs, "
        f"{summary.get('wall_time', 0):.1f}s")
    return summary


def sweep_k(method: str, run_dir: Path, work: Path, deadline: Deadline, extra: list = ()) -> str:
    """Figure 4a's k sweep through `ssd-eval --sweep-k`, where that option exists."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **THREADS)
    helptext = subprocess.run([sys.executable, "-m", "ssd_megatron", "eval", "--help"], env=env, cwd=ROOT,
                              capture_output=True, text=True).stdout
    if "--sweep-k" not in helptext:
        return "skipped: ssd-eval has no --sweep-k in this build"
    logfile = work / "logs" / f"{method}_sweep.log"
    left = deadline.left()
    if left is not None and left < 20:
        return "skipped: deadline"
    try:
        run([sys.executable, "-m", "ssd_megatron", "eval", str(run_dir), "--sweep-k", *extra], logfile, timeout=left)
    except (RuntimeError, TimeoutError) as e:
        return f"failed: {str(e).splitlines()[0]}"
    return "ok" if (run_dir / "report" / "sweep_k.json").is_file() else "ran, but wrote no report/sweep_k.json"


# --------------------------------------------------------------------------- report


def report(work: Path, out: Path, p: dict, args) -> dict:
    sys.path.insert(0, str(ROOT))
    from ssd_megatron.report.compare import write_comparison

    runs = [work / "runs" / m for m in METHODS if (work / "runs" / m / "metrics.jsonl").is_file()]
    if not runs:
        raise SystemExit("report: no finished runs under " + str(work / "runs"))
    out.mkdir(parents=True, exist_ok=True)
    result = write_comparison(runs, out, baseline="dense")
    device = _device_name()
    table = []
    for row in result["rows"]:
        summ_path = work / "runs" / row["method"] / "summary.json"
        summ = json.loads(summ_path.read_text()) if summ_path.is_file() else {}
        table.append({
            "method": row["method"], "steps": row["steps"], "complete": row["steps"] == p["steps"],
            "final_ppl": row["final_ppl"], "ppl_vs_dense": row.get("ppl_vs_baseline"),
            "train_flops": row["train_flops"], "flops_vs_dense": _inv(row.get("flops_speedup")),
            "step_time_s": row["step_time_s"], "time_vs_dense": _inv(row.get("time_speedup")),
            "wall_time_s": row["wall_time_s"], "wall_vs_dense": _inv(row.get("wall_speedup")), "phases": row["phases"], "sweep": summ.get("sweep")})
    results = {"preset": args.preset, "device": device, "date": time.strftime("%Y-%m-%d"),
               "settings": p, "compile": bool(args.compile), "cuda_graph": bool(args.cuda_graph),
               "backend": args.backend,
               "configs": {m: (work / "configs" / f"{m}.yaml").read_text()
                           for m in METHODS if (work / "configs" / f"{m}.yaml").is_file()},
               "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    # One file with every run's metrics (the device tool returns at most 8 files).
    metrics = {r.name: (r / "metrics.jsonl").read_text().splitlines() for r in runs}
    (out / "metrics_all.json").write_text(json.dumps(metrics))
    # The same runs in a few kB (metrics_all.json of a 9 000-step pair is ~8 MB): validation points and
    # the phase every 100 steps.
    curves = {}
    for name, lines in metrics.items():
        recs = [json.loads(line) for line in lines if line.startswith("{")]
        curves[name] = [{k: r[k] for k in ("step", "valid_loss", "valid_ppl")} for r in recs if r.get("kind") == "valid"]
        curves[name + "_phases"] = [(r["step"], r.get("phase")) for r in recs
                                    if r.get("kind") == "train" and r["step"] % 100 == 0]
    (out / "valid_curves.json").write_text(json.dumps(curves, indent=0))
    print()
    print(f"## {args.preset} experiment on {device}: {p['steps']} steps x {p['global_batch']} x {p['seq_len']} "
          f"tokens, GPT {p['n_layers']}x{p['d_model']} d_ff {p['d_ff']}")
    print()
    print("| method | steps | final ppl | ppl / dense | train FLOPs | FLOPs / dense | step time | time / dense "
          "| wall time | wall / dense | phases |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for t in table:
        steps = f"{t['steps']}" + ("" if t["complete"] else " (cut)")
        print(f"| {t['method']} | {steps} | {_f(t['final_ppl'])} | {_f(t['ppl_vs_dense'], 3)} | {t['train_flops']:.3e} | "
              f"{_f(t['flops_vs_dense'], 3)} | {t['step_time_s']:.1f}s | {_f(t['time_vs_dense'], 3)} | "
              f"{t['wall_time_s']:.1f}s | {_f(t['wall_vs_dense'], 3)} | "
              f"{', '.join(f'{k}:{v}' for k, v in t['phases'].items())} |")
    log(f"report: {out}/compare.md, results.json, fig3_ppl_vs_train_flops.png, fig4a_ppl_vs_inference_flops.png")
    return results


def _inv(x):
    return None if not x else 1.0 / x


def _f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the CPU preset (same as --preset tiny)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS))
    ap.add_argument("--stages", nargs="+", default=["all"], choices=("all",) + STAGES)
    ap.add_argument("--work", default=None, help="work directory (default runs/experiment_<preset>)")
    ap.add_argument("--out", default=None, help="results directory (default $OUT, else WORK/out)")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    ap.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backend", default="auto", help="expert backend for the MoE methods (ssd.backend)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every method (default off, for all)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="train.cuda_graph: auto for every method (dense and SSD steps captured; baselines eager)")
    ap.add_argument("--workers", type=int, default=max(1, min(16, os.cpu_count() or 1)))
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per training process (OMP_NUM_THREADS; the tiny preset uses 1: tiny matmuls "
                         "gain nothing from more, and OpenMP spinning collapses on a shared machine)")
    ap.add_argument("--schedule", default="cosine", choices=["cosine", "noam"],
                    help="LR schedule for every method: cosine to lr/10, or the paper's Noam with the same peak")
    ap.add_argument("--no-sweep", action="store_true", help="skip the Fig. 4a k sweeps after training")
    ap.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    ap.add_argument("--deadline-minutes", type=float, default=None,
                    help="start no run that cannot finish, cut a run at, and write the report by this time")
    args = ap.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.tiny else "gpu")
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
        p["warmup"] = min(p["warmup"], max(1, args.steps // 20))
    p["schedule"] = args.schedule
    threads = args.threads or p.get("threads")
    if threads:
        THREADS.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    work = Path(args.work or ROOT / "runs" / f"experiment_{args.preset}").resolve()
    out = Path(args.out or os.environ.get("OUT") or work / "out").resolve()
    stages = STAGES if "all" in args.stages else [s for s in STAGES if s in args.stages]
    work.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.deadline_minutes)
    log(f"preset {args.preset}, stages {' '.join(stages)}, work {work}, out {out}")
    data = None
    if any(s in METHODS or s == "data" for s in stages):
        data = build_corpus(work, p, args.force and "data" in stages, args.workers)
    failures = {}
    for m in RUN_ORDER:
        if m in stages:
            try:
                train_method(m, work, p, data, args, deadline)
            except (RuntimeError, TimeoutError) as e:  # report the others; the table says what is missing
                failures[m] = str(e)
                log(f"{m}: FAILED\n{e}")
    if "report" in stages:
        report(work, out, p, args)
    if failures:
        out.mkdir(parents=True, exist_ok=True)
        (out / "failures.json").write_text(json.dumps(failures, indent=1))
        log(f"failed methods: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
