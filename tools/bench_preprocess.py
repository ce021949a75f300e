#!/usr/bin/env python
"""Measure ``ssd-data preprocess`` throughput (MB/s of input) for several worker counts.

Input: the embedded default corpus's source files (the Python standard library) written as one
JSON-lines file, repeated ``--repeat`` times, tokenised with the default corpus's 8000-piece tokenizer.
Each configuration runs ``--trials`` times and the median is reported; the load average is printed too,
because on a shared machine other processes compete for the same cores.

    python tools/bench_preprocess.py --workers 1 2 --trials 3 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_megatron.data.corpus import ensure_default_corpus, stdlib_files  # noqa: E402
from ssd_megatron.data.preprocess import preprocess  # noqa: E402


def _write_input(path: Path, repeat: int) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for src in stdlib_files():
                text = src.read_text(encoding="utf-8", errors="replace")
                if text:
                    f.write(json.dumps({"text": text}) + "\n")
    return path.stat().st_size


def _children_cpu() -> float:
    """CPU seconds of reaped child processes (the pool's workers, once the pool has closed)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="copies of the stdlib corpus in the input")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    _, tokenizer = ensure_default_corpus(progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench.jsonl"
        size = _write_input(src, args.repeat)
        for w in args.workers:
            runs = []
            for _ in range(args.trials):
                load = os.getloadavg()[0]
                t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
                stats = preprocess([src], tokenizer, Path(tmp) / f"out{w}", workers=w, valid_fraction=0.01,
                                   progress=False, log=None)
                runs.append({"seconds": time.perf_counter() - t0, "main_cpu_s": time.process_time() - c0,
                             "workers_cpu_s": _children_cpu() - k0, "load1": load, "tokens": stats.tokens,
                             "documents": stats.documents})
            sec = statistics.median(r["seconds"] for r in runs)
            main_cpu = statistics.median(r["main_cpu_s"] for r in runs)
            work_cpu = statistics.median(r["workers_cpu_s"] for r in runs)
            rows.append({"workers": w, "mb": size / 1e6, "seconds": sec, "mb_per_s": size / 1e6 / sec,
                         "main_cpu_s": main_cpu, "workers_cpu_s": work_cpu,
                         "mb_per_cpu_s": size / 1e6 / (main_cpu + work_cpu),
                         "tokens_per_s": runs[0]["tokens"] / sec, "tokens": runs[0]["tokens"],
                         "documents": runs[0]["documents"], "load1": statistics.mean(r["load1"] for r in runs),
                         "trials": runs})
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d"),
            "tokenizer": tokenizer, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    print(f"preprocess throughput, {os.cpu_count()} CPUs, input {rows[0]['mb']:.1f} MB jsonl "
          f"({rows[0]['documents']} docs, {rows[0]['tokens']} tokens), median of {args.trials}")
    print("MB/s = wall-clock throughput; MB/cpu-s = per CPU-second over all processes (load-independent); "
          "load1 = 1-min load average during the runs")
    print(f"{'workers':>7} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'main cpu':>9} {'worker cpu':>10} "
          f"{'MB/cpu-s':>9} {'load1':>6}")
    for r in rows:
        print(f"{r['workers']:>7} {r['seconds']:>8.2f} {r['mb_per_s']:>7.2f} {r['tokens_per_s'] / 1e6:>7.2f} "
              f"{r['main_cpu_s']:>9.2f} {r['workers_cpu_s']:>10.2f} {r['mb_per_cpu_s']:>9.2f} {r['load1']:>6.1f}")


if __name__ == "__main__":
    main()
