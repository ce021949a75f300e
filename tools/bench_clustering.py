#!/usr/bin/env python
"""Benchmark SSD's balanced k-means: assignment methods, backends, cold vs warm start, 12-layer total.

    python tools/bench_clustering.py                       # CPU, both sizes, writes the JSON below
    python tools/bench_clustering.py --device cuda --out benchmarks/results/clustering_gpu.json
    python tools/bench_clustering.py --sizes base --methods greedy --exchange 8 --layers 12

Data: synthetic rows shaped like a trained FFN's W_i (see `synthetic_weights`); `--weights FILE`
clusters real matrices instead (a .pt holding a tensor or a list/dict of 2-D tensors). A "warm"
measurement perturbs the weights (training drift between two monitors) and runs paper eq. 3
(cold + warm start from the previous labels, keep the lower WCSS). Prints a table last and writes
JSON with machine info, load average and date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ssd_megatron.ssd import clustering as C  # noqa: E402
from ssd_megatron.ssd.ari import adjusted_rand_index  # noqa: E402

SIZES = {"base": (6144, 768, 32), "large": (16384, 4096, 64)}


def synthetic_weights(n: int, d: int, k: int, seed: int, noise: float = 2.0) -> torch.Tensor:
    """Rows around 1.5*k random directions with unequal group sizes plus isotropic noise.

    Cosine between two rows of one group is about 1/(1+noise^2) = 0.2: clustered but far from
    separable, and the natural groups are unequal, so the balance constraint binds (as in real W_i).
    """
    g = torch.Generator().manual_seed(seed)
    groups = max(2, int(1.5 * k))
    p = torch.rand(groups, generator=g) ** 2 + 0.05
    z = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    centers = torch.randn(groups, d, generator=g)
    return centers[z] + noise * torch.randn(n, d, generator=g)


def drift(w: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return w + scale * w.std() * torch.randn(w.shape, generator=g).to(w.device)


def machine_info(device: torch.device) -> dict:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def timed(fn):
    """(result, wall seconds, process CPU seconds)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def load_weights(path: str, device: torch.device) -> list:
    obj = torch.load(path, map_location="cpu")
    mats = obj.values() if isinstance(obj, dict) else (obj if isinstance(obj, (list, tuple)) else [obj])
    return [m.to(device) for m in mats if isinstance(m, torch.Tensor) and m.dim() == 2]


def bench_config(w, w2, k, method, exchange, backend, seed):
    kw = dict(assignment=method, exchange_rounds=exchange, backend=backend, seed=seed)
    cold, wall, cpu = timed(lambda: C.balanced_kmeans(w, k, **kw))
    warm, wall2, cpu2 = timed(lambda: C.cluster_neurons(w2, k, prev_labels=cold.labels, **kw))
    return {
        "method": method, "exchange_rounds": exchange, "backend": backend,
        "cold_s": wall, "cold_cpu_s": cpu, "cold_wcss": cold.wcss, "cold_iters": cold.iterations,
        "eq3_s": wall2, "eq3_cpu_s": cpu2, "eq3_wcss": warm.wcss, "eq3_winner": warm.start,
        "eq3_candidates": warm.candidates, "ari_prev_new": adjusted_rand_index(cold.labels, warm.labels),
    }


def exact_step(configs, device, seed) -> list:
    """One balanced E-step at the base size (centroids after 10 unbalanced Lloyd steps, so the balance
    constraint binds) for each config, against scipy's exact linear_sum_assignment."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    n, d, k = SIZES["base"]
    size = n // k
    x = C.normalize_rows(synthetic_weights(n, d, k, seed)).to(device)
    cents = C._lloyd_unbalanced(x[None], C._kmeans_pp(x[None], k, [seed]), 10)[0]
    cost = C._sq_cost(x, cents) + (x * x).sum(1, keepdim=True)  # full squared distances
    cost64 = cost.double().cpu().numpy()
    t0 = time.perf_counter()
    rows, cols = linear_sum_assignment(np.repeat(cost64, size, axis=1))
    exact_s = time.perf_counter() - t0
    opt = float(cost64[rows, cols // size].sum())
    out = []
    for method, ex in configs:
        C.balanced_assignment(cost, size, method, ex)  # warm-up
        labels, wall, _ = timed(lambda: C.balanced_assignment(cost, size, method, ex))
        got = float(cost64[np.arange(n), labels.cpu().numpy()].sum())
        out.append({"method": method, "exchange_rounds": ex, "shape": [n, d], "n_clusters": k,
                    "seconds": wall, "cost": got, "exact_cost": opt, "excess_pct": 100 * (got / opt - 1),
                    "exact_seconds": exact_s})
    return out


def summarize(rows: list) -> list:
    """Per (size, backend, method, exchange): median seconds and mean WCSS excess over the best run
    (any config, any backend) on the same weight matrix."""
    best_cold, best_eq3 = {}, {}
    for r in rows:
        key = (r["size"], r["data_seed"])
        best_cold[key] = min(best_cold.get(key, float("inf")), r["cold_wcss"])
        best_eq3[key] = min(best_eq3.get(key, float("inf")), r["eq3_wcss"])
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["size"], r["backend"], r["method"], r["exchange_rounds"]), []).append(r)
    out = []
    for (size, backend, method, ex), rs in groups.items():
        def mean(f):
            return sum(f(r) for r in rs) / len(rs)

        def median(f):  # times: robust to a spike from other work on a shared machine
            vals = sorted(f(r) for r in rs)
            mid = len(vals) // 2
            return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])

        out.append({
            "size": size, "backend": backend, "method": method, "exchange_rounds": ex, "runs": len(rs),
            "cold_s": median(lambda r: r["cold_s"]), "eq3_s": median(lambda r: r["eq3_s"]),
            "cold_iters": mean(lambda r: r["cold_iters"]),
            "cold_wcss": mean(lambda r: r["cold_wcss"]), "eq3_wcss": mean(lambda r: r["eq3_wcss"]),
            "cold_excess_pct": mean(lambda r: 100 * (r["cold_wcss"] / best_cold[(r["size"], r["data_seed"])] - 1)),
            "eq3_excess_pct": mean(lambda r: 100 * (r["eq3_wcss"] / best_eq3[(r["size"], r["data_seed"])] - 1)),
            "warm_won": f"{sum(r['eq3_winner'] == 'warm' for r in rs)}/{len(rs)}",
            "ari_prev_new": mean(lambda r: r["ari_prev_new"]),
        })
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="base,large", help="comma list of: " + ", ".join(SIZES))
    ap.add_argument("--configs", default="greedy:0,greedy:8,sinkhorn:0,sinkhorn:8,auction:0",
                    help="comma list of assignment:exchange_rounds")
    ap.add_argument("--seeds", type=int, default=3, help="weight matrices per size (results are averaged)")
    ap.add_argument("--backends", default="torch,faiss")
    ap.add_argument("--layers", type=int, default=12, help="layers in the all-layer total (base size)")
    ap.add_argument("--drift", type=float, default=0.15, help="weight change between monitors, x std")
    ap.add_argument("--weights", default=None, help=".pt file with real W_i matrices (replaces synthetic)")
    ap.add_argument("--exact", action="store_true",
                    help="also score one E-step per config against scipy's exact assignment (base size, ~1 min)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/clustering_<dev>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_path = args.out or os.path.join("benchmarks", "results", f"clustering_{device.type}.json")
    info = machine_info(device)
    info["loadavg_start"] = os.getloadavg()
    results = {"machine": info, "configs": [], "all_layers": [],
               "defaults": {"assignment": C.DEFAULT_ASSIGNMENT, "exchange_rounds": C.DEFAULT_EXCHANGE_ROUNDS,
                            "iters": C.DEFAULT_ITERS}}
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    backends = args.backends.split(",")
    real = load_weights(args.weights, device) if args.weights else None

    # warm-up (first-call overheads: allocator, faiss/OpenMP thread pools)
    C.balanced_kmeans(synthetic_weights(256, 32, 8, 0).to(device), 8, backend=backends[0])

    for size_name in args.sizes.split(","):
        for seed in range(args.seed, args.seed + args.seeds):
            if real is not None:
                w = real[seed % len(real)]
                n, d = w.shape
                k = SIZES[size_name][2]
            else:
                n, d, k = SIZES[size_name]
                w = synthetic_weights(n, d, k, seed).to(device)
            w2 = drift(w, seed, args.drift)
            for backend in backends:
                for method, ex in configs:
                    row = bench_config(w, w2, k, method, ex, backend, seed)
                    row.update(size=size_name, shape=[n, d], n_clusters=k, data_seed=seed)
                    results["configs"].append(row)
                    print(f"{size_name:5s} seed {seed} {backend:5s} {method:8s} ex={ex:<2d} cold {row['cold_s']:7.2f}s "
                          f"wcss {row['cold_wcss']:.2f} it {row['cold_iters']:2d} | eq3 {row['eq3_s']:7.2f}s "
                          f"wcss {row['eq3_wcss']:.2f} ({row['eq3_winner']}) ari {row['ari_prev_new']:.3f}",
                          flush=True)

    # all layers at the base size with the default configuration: the first monitor (cold starts
    # only) and every later monitor (eq. 3: cold + warm), as one batched call (cluster_layers, what
    # the monitor uses) and as a loop of per-layer calls for comparison
    n, d, k = SIZES["base"]
    if args.layers > 0 and "base" in args.sizes.split(","):
        ws = [real[i % len(real)] if real else synthetic_weights(n, d, k, 1000 + i).to(device)
              for i in range(args.layers)]
        ws2 = [drift(w, i, args.drift) for i, w in enumerate(ws)]
        for backend in backends:
            first, t_first, _ = timed(lambda: C.cluster_layers(ws, k, backend=backend, seed=0))
            prev = [r.labels for r in first]
            later, t_later, _ = timed(lambda: C.cluster_layers(ws2, k, prev, backend=backend, seed=0))
            _, l_first, _ = timed(lambda: [C.cluster_neurons(w, k, backend=backend, seed=i) for i, w in enumerate(ws)])
            _, l_later, _ = timed(lambda: [C.cluster_neurons(w, k, p, backend=backend, seed=i)
                                           for i, (w, p) in enumerate(zip(ws2, prev))])
            results["all_layers"].append({
                "backend": backend, "layers": args.layers, "shape": [n, d], "n_clusters": k,
                "first_monitor_s": t_first, "later_monitor_s": t_later,
                "loop_first_monitor_s": l_first, "loop_later_monitor_s": l_later,
                "later_warm_won": sum(r.start == "warm" for r in later),
                "later_mean_ari": sum(adjusted_rand_index(p, r.labels) for p, r in zip(prev, later)) / len(prev),
            })

    if args.exact:
        results["exact_step"] = exact_step(configs, device, args.seed)

    info["loadavg_end"] = os.getloadavg()
    results["summary"] = summarize(results["configs"])
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)

    # ---- table
    print(f"\n# balanced k-means, {info['device']} ({info.get('gpu') or info['cpu_model']}, "
          f"{info['torch_threads']} threads), load avg {info['loadavg_start'][0]:.1f}->{info['loadavg_end'][0]:.1f}; "
          f"over {args.seeds} weight matrices: median seconds, mean +% = WCSS above the best run on the same matrix")
    print(f"{'size':6s} {'backend':7s} {'method':8s} {'ex':>2s} {'cold s':>7s} {'cold +%':>8s} {'it':>4s} "
          f"{'eq3 s':>7s} {'eq3 +%':>7s} {'warm won':>8s} {'ARI':>6s}")
    for r in results["summary"]:
        print(f"{r['size']:6s} {r['backend']:7s} {r['method']:8s} {r['exchange_rounds']:2d} {r['cold_s']:7.2f} "
              f"{r['cold_excess_pct']:8.3f} {r['cold_iters']:4.0f} {r['eq3_s']:7.2f} {r['eq3_excess_pct']:7.3f} "
              f"{r['warm_won']:>8s} {r['ari_prev_new']:6.3f}")
    for r in results.get("exact_step", []):
        print(f"one E-step {r['shape'][0]}x{r['n_clusters']}: {r['method']}+{r['exchange_rounds']:<2d} "
              f"{1e3 * r['seconds']:7.1f} ms, cost +{r['excess_pct']:.3f}% vs exact "
              f"(scipy {r['exact_seconds']:.0f} s)")
    for r in results["all_layers"]:
        print(f"all {r['layers']} layers {r['shape'][0]}x{r['shape'][1]} N={r['n_clusters']} ({r['backend']}, "
              f"{C.DEFAULT_ASSIGNMENT}+{C.DEFAULT_EXCHANGE_ROUNDS}): first monitor {r['first_monitor_s']:.2f}s, "
              f"later monitors (cold+warm) {r['later_monitor_s']:.2f}s batched "
              f"[per-layer loop: {r['loop_first_monitor_s']:.2f}s / {r['loop_later_monitor_s']:.2f}s]; "
              f"warm won {r['later_warm_won']}/{r['layers']}, mean ARI {r['later_mean_ari']:.3f}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
