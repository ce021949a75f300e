"""One line per profiled kernel from the CSV that `ncu --csv --metrics A,B,...` prints: its id, name and each metric's
value (the files benchmarks/results/ncu_*_s44_*.txt were made this way from the last 7 launches).

    ncu --clock-control none --cache-control none --kernel-name regex:"down_ws|wgrad_ws" --metrics \\
        gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed --csv \\
        python3 tools/ab_layer.py --shape 8b --eager --rounds 1 --arm default= --iters 3 > ncu.csv
    python3 tools/ncu_digest.py ncu.csv --last 7

Lines that are not CSV rows (the program's own output, ncu's ==PROF== notes) are skipped.
"""
import argparse
import csv
import sys


def digest(path: str) -> list:
    """[(id, kernel name, {metric: value})] in the order profiled."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if len(r) > 10]
    if not rows or "Metric Name" not in rows[0]:
        raise SystemExit(f"error: {path}: no ncu --csv metric table in it (expected a header with 'Metric Name')")
    head = rows[0]
    ki, ni, mi, vi = (head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value"))
    kernels: dict = {}
    for r in rows[1:]:
        kernels.setdefault(r[ki], (r[ni], {}))[1][r[mi]] = r[vi]
    return [(k, name, metrics) for k, (name, metrics) in kernels.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--last", type=int, default=0, help="only the last N kernels (default: all)")
    args = ap.parse_args()
    for k, name, metrics in digest(args.csv)[-args.last:]:
        print(k, name, " ".join(f"{m.split('.')[0]}={v}" for m, v in sorted(metrics.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
