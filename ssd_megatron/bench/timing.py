"""Timing for the benchmarks and tools: medians of CUDA events around each call (host timers where `CUDA` is
False), and CUDA-graph capture by torch's recipe."""
from __future__ import annotations

import statistics
import time

import torch


class _HostEvent:
    """Stand-in for torch.cuda.Event on CPU smoke runs (--device cpu)."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


CUDA = True  # CUDA events (else host timers: `ssd-bench ffn --device cpu`'s smoke runs)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _event():
    return torch.cuda.Event(enable_timing=True) if CUDA else _HostEvent()


def time_calls(fn, n_iter, n_warm, pre=None, groups: int = 1) -> dict:
    """Median/min/max ms of fn(i) between CUDA events; `pre(i)` runs untimed before each. With `groups` > 1 also each
    group's median (`group_medians`: call i in group i % groups, e.g. a Case's rotated layers)."""
    for i in range(n_warm):
        if pre:
            pre(i)
        fn(i)
    _sync()
    evs, host = [], []
    for i in range(n_iter):
        if pre:
            pre(i)
        s, e = _event(), _event()
        t0 = time.perf_counter()
        s.record()
        fn(i)
        e.record()
        host.append((time.perf_counter() - t0) * 1e3)
        evs.append((s, e))
    _sync()
    ts = [s.elapsed_time(e) for s, e in evs]
    out = {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts),
           "host_median": statistics.median(host)}
    if groups > 1:
        out["group_medians"] = [statistics.median(ts[g::groups]) for g in range(groups) if ts[g::groups]]
    return out


def capture_graph(fn):
    """(a CUDA graph of fn(), fn's outputs in it), after two warm-up calls on a side stream (torch's recipe)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out
