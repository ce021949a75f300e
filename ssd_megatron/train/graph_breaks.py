"""torch.compile's graph breaks in a run's compiled blocks (`train.compile`), told once per new reason.

A break splits a compiled block into several graphs with guards, resumes and eager Python between them, paid on the
host in every eager step. Nothing else shows it: the losses are the same. Three breaks per sparse layer (torch
2.11 could not take a bound method's truth value) had doubled GPT-base's eager sparse step on an H100 (86.6-125 ms
against 43-46 ms without them; docs/kernels.md v30). SSD compiles its sparse graphs at the first sparse step, so the
watch runs after every step, not only after the first. Dynamo's counters are per process and never cleared, so the
watch counts from its own start. Dynamo counts a break when it compiles the graph around it: a later run of the same
process that reuses an earlier run's compiled graphs (same code, guards hold) breaks there too but is not told again.
`compile_counts` gives the totals that `ssd-bench step` records per run.
"""
from __future__ import annotations


def reason_line(reason: str) -> str:
    """A break's reason as one line: its first line and its debug context (which names the call it broke at),
    without dynamo's explanation and hints."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    return " | ".join(lines[:1] + [ln for ln in lines if ln.startswith("Developer debug context")])


def _counts() -> dict:
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"])


def compile_counts(before: dict = None) -> dict:
    """torch.compile's graphs compiled and graph breaks met in this process (running totals), or since `before`
    (an earlier call's result)."""
    from torch._dynamo.utils import counters
    now = {"compiled_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(_counts().values())}
    return now if before is None else {k: v - before[k] for k, v in now.items()}


class GraphBreakWatch:
    def __init__(self):
        self._start = _counts()
        self._told: set = set()

    def new(self) -> list[str]:
        """One line per reason that has broken a graph since the watch started and was not told yet."""
        lines = []
        for reason, n in _counts().items():
            met = n - self._start.get(reason, 0)
            if met > 0 and reason not in self._told:
                self._told.add(reason)
                lines.append(f"{met} x {reason_line(reason)}")
        return lines
