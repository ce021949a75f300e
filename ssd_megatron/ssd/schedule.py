"""SSD's phase state machine: when to switch between dense and sparse training (paper §4.3, app. C).

Steps are 0-based optimizer steps; "at step s" means before step s runs (after s steps are done).
Phases are half-open intervals [start, end) of steps.

Rules
- Training starts dense. While dense, a *monitor* happens every `monitor_interval` steps counted
  from the start of the current dense phase (start + m, start + 2m, ...; never at the start itself).
  The caller clusters every layer there and reports the mean ARI against the previous clustering.
- threshold policy: switch to sparse at a monitor step s when mean ARI > τ (strictly). random policy
  (Table 5 ablation): switch with probability 0.5, drawn from (seed, s) alone, so it is deterministic
  and needs no RNG state in checkpoints.
- The sparse phase lasts T = round(r / (1 - r - l) * D) steps (round half up), D = s - start of the
  dense phase that just ended; then training is dense again and monitoring restarts from there.
- The last `round(l * total_steps)` steps are always dense: a sparse phase is cut at that boundary and
  no monitor (hence no switch) happens inside it.

Reference semantics after a sparse phase (documented choice): the first monitor of a new dense phase
compares with the most recent clustering, which is the one taken at the dense->sparse switch (it
defined the experts); no fresh pair of monitors is needed. This is what the paper's appendix C example
requires: later dense phases of exactly one monitor interval (3 000 steps -> 3 750 sparse) exist, so
one monitor after a sparse phase must be able to switch. The schedule itself only sees `mean_ari`;
`None` means "no previous clustering" (the very first monitor of training) and never switches under
the threshold policy.

Worked example (r=0.5, l=0.1 so T = 1.25 D; monitors every 3 000): τ first exceeded at the 6th
monitor (step 18 000) -> sparse [18 000, 40 500); dense again, the monitor at 43 500 stays below τ,
the one at 46 500 exceeds it -> D = 6 000 -> sparse [46 500, 54 000); a later dense phase whose first
monitor exceeds τ has D = 3 000 -> 3 750 sparse steps.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ssd_megatron.errors import UserError

DENSE = "dense"
SPARSE = "sparse"
POLICIES = ("threshold", "random")
_STATE_VERSION = 1


@dataclass
class PhaseInterval:
    """Steps [start, end) ran in `phase`; `end` is None while the interval is open."""

    phase: str
    start: int
    end: Optional[int] = None

    def to_list(self) -> list:
        return [self.phase, self.start, self.end]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def validate_schedule_params(
    total_steps, monitor_interval, threshold, sparse_ratio, final_dense_ratio, policy
) -> None:
    """Raise UserError naming the config key for any invalid SSD schedule parameter."""

    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(total_steps, int) and not isinstance(total_steps, bool) and total_steps > 0):
        raise UserError(f"train.max_steps must be a positive integer, got {total_steps!r}")
    if not (isinstance(monitor_interval, int) and not isinstance(monitor_interval, bool) and monitor_interval > 0):
        raise UserError(f"ssd.monitor_interval must be a positive integer (steps), got {monitor_interval!r}")
    if not (num(threshold) and 0.0 <= threshold <= 1.0):
        raise UserError(f"ssd.threshold must be a number in [0, 1], got {threshold!r}")
    if not (num(sparse_ratio) and 0.0 < sparse_ratio < 1.0):
        raise UserError(f"ssd.sparse_ratio must be a number in (0, 1), got {sparse_ratio!r}")
    if not (num(final_dense_ratio) and 0.0 <= final_dense_ratio < 1.0):
        raise UserError(f"ssd.final_dense_ratio must be a number in [0, 1), got {final_dense_ratio!r}")
    if sparse_ratio + final_dense_ratio >= 1.0:
        raise UserError(
            f"ssd.sparse_ratio + ssd.final_dense_ratio must be < 1, got {sparse_ratio} + {final_dense_ratio}"
        )
    if policy not in POLICIES:
        raise UserError(f"ssd.switch_policy must be one of {', '.join(POLICIES)}, got {policy!r}")


class PhaseSchedule:
    """Dense/sparse phase decisions for SSD (see the module docstring for the exact rules).

    Typical loop, at the start of every step s:
        sched.step(s)                       # time-based sparse->dense transitions
        if sched.should_monitor(s):
            ari = mean ARI(clustering now, previous clustering)    # None if there is none
            new = sched.observe(s, ari)     # "sparse" when switching
        run step s in sched.current_phase
    """

    def __init__(
        self,
        total_steps: int,
        monitor_interval: int = 3000,
        threshold: float = 0.9,
        sparse_ratio: float = 0.5,
        final_dense_ratio: float = 0.1,
        policy: str = "threshold",
        seed: int = 0,
    ):
        validate_schedule_params(total_steps, monitor_interval, threshold, sparse_ratio, final_dense_ratio, policy)
        self.total_steps = int(total_steps)
        self.monitor_interval = int(monitor_interval)
        self.threshold = float(threshold)
        self.sparse_ratio = float(sparse_ratio)
        self.final_dense_ratio = float(final_dense_ratio)
        self.policy = policy
        self.seed = int(seed)
        # T / D: sparse steps per step of the dense phase before it (paper: r / (1 - r - l)).
        self.sparse_per_dense = self.sparse_ratio / (1.0 - self.sparse_ratio - self.final_dense_ratio)
        self.final_dense_start = self.total_steps - _round_half_up(self.final_dense_ratio * self.total_steps)
        self._history: list[PhaseInterval] = [PhaseInterval(DENSE, 0, None)]
        self._sparse_end: Optional[int] = None
        self._last_step = 0
        self.monitor_log: list[dict] = []  # {"step", "ari", "switched"} per observed monitor

    # ---------------------------------------------------------------- queries

    @property
    def current_phase(self) -> str:
        return self._history[-1].phase

    @property
    def phase_start(self) -> int:
        return self._history[-1].start

    @property
    def history(self) -> list[PhaseInterval]:
        """All phase intervals so far; the last one is open (end None), except that a sparse phase
        carries its planned end."""
        out = [PhaseInterval(h.phase, h.start, h.end) for h in self._history]
        if out[-1].phase == SPARSE:
            out[-1].end = self._sparse_end
        return out

    def _now(self, step: int) -> tuple[str, int]:
        """(phase, phase start) at `step` given the current state, without mutating it."""
        cur = self._history[-1]
        if cur.phase == SPARSE and step >= self._sparse_end:
            return DENSE, self._sparse_end
        return cur.phase, cur.start

    def phase_at(self, step: int) -> str:
        """Phase of `step`: recorded for past steps; for later steps, as planned now (a pending sparse
        phase ends on time; future monitors are unknown, so those steps read as dense)."""
        for h in reversed(self._history):
            if step >= h.start:
                if h is self._history[-1]:
                    return self._now(step)[0]
                return h.phase
        raise ValueError(f"step must be >= 0, got {step}")

    phase = phase_at  # name used in docs/interfaces.md

    def should_monitor(self, step: int) -> bool:
        """True at the steps where the caller must cluster and call `observe`."""
        phase, start = self._now(step)
        return (
            phase == DENSE
            and step < self.final_dense_start
            and step > start
            and (step - start) % self.monitor_interval == 0
        )

    def next_monitor(self, step: int) -> Optional[int]:
        """The first monitor step >= `step` under the current plan (None if none before the final phase)."""
        phase, start = self._now(step)
        if phase == SPARSE:
            start, step = self._sparse_end, max(step, self._sparse_end)
        m = self.monitor_interval
        k = max(1, -(-(step - start) // m))
        cand = start + k * m
        return cand if cand < self.final_dense_start else None

    def sparse_steps(self, upto: Optional[int] = None) -> int:
        """Number of sparse steps in [0, upto) (default: up to the last step seen)."""
        upto = self._last_step if upto is None else upto
        total = 0
        for h in self.history:
            if h.phase == SPARSE:
                end = h.end if h.end is not None else upto
                total += max(0, min(end, upto) - h.start)
        return total

    # ---------------------------------------------------------------- transitions

    def _check_time(self, step: int) -> None:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if step < self._last_step:
            raise ValueError(f"steps must not go backwards: got {step} after {self._last_step}")

    def step(self, step: int) -> Optional[str]:
        """Apply time-based transitions up to `step`; returns "dense" if a sparse phase ended."""
        self._check_time(step)
        self._last_step = int(step)
        cur = self._history[-1]
        if cur.phase == SPARSE and step >= self._sparse_end:
            cur.end = self._sparse_end
            self._history.append(PhaseInterval(DENSE, self._sparse_end, None))
            self._sparse_end = None
            return DENSE
        return None

    def _wants_switch(self, step: int, mean_ari: Optional[float]) -> bool:
        if self.policy == "random":
            return bool(np.random.default_rng([self.seed, int(step)]).random() < 0.5)
        return mean_ari is not None and float(mean_ari) > self.threshold

    def observe(self, step: int, mean_ari: Optional[float]) -> Optional[str]:
        """Report the monitor at `step` (mean ARI over layers, or None if there is no previous
        clustering). Returns "sparse" if training switches to sparse at this step, else None."""
        self.step(step)
        if not self.should_monitor(step):
            raise ValueError(
                f"observe() at step {step}, which is not a monitor step "
                f"(phase {self.current_phase} since {self.phase_start}; next monitor {self.next_monitor(step)})"
            )
        if self.monitor_log and self.monitor_log[-1]["step"] == step:
            raise ValueError(f"monitor at step {step} was already observed")
        switch = self._wants_switch(step, mean_ari)
        sparse_len = _round_half_up(self.sparse_per_dense * (step - self.phase_start)) if switch else 0
        end = min(step + sparse_len, self.final_dense_start)
        switched = switch and end > step
        self.monitor_log.append(
            {"step": int(step), "ari": None if mean_ari is None else float(mean_ari), "switched": switched}
        )
        if not switched:
            return None
        self._history[-1].end = int(step)
        self._history.append(PhaseInterval(SPARSE, int(step), None))
        self._sparse_end = int(end)
        return SPARSE

    # ---------------------------------------------------------------- checkpointing

    def _params(self) -> dict:
        return {
            "total_steps": self.total_steps,
            "monitor_interval": self.monitor_interval,
            "threshold": self.threshold,
            "sparse_ratio": self.sparse_ratio,
            "final_dense_ratio": self.final_dense_ratio,
            "policy": self.policy,
            "seed": self.seed,
        }

    def state_dict(self) -> dict:
        """Plain JSON-able state (ints, floats, strings, lists, None)."""
        return {
            "version": _STATE_VERSION,
            "params": self._params(),
            "history": [h.to_list() for h in self._history],
            "sparse_end": self._sparse_end,
            "last_step": self._last_step,
            "monitor_log": [dict(m) for m in self.monitor_log],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`. Parameters come from the constructor (the config); if they
        differ from the saved ones a warning is issued and a pending sparse phase is re-cut at the
        (possibly new) final-dense boundary."""
        try:
            if state.get("version") != _STATE_VERSION:
                raise ValueError(f"unsupported schedule state version {state.get('version')!r}")
            history = [PhaseInterval(str(p), int(s), None if e is None else int(e)) for p, s, e in state["history"]]
            sparse_end = state["sparse_end"]
            last_step = int(state["last_step"])
            log = [
                {
                    "step": int(m["step"]),
                    "ari": None if m["ari"] is None else float(m["ari"]),
                    "switched": bool(m["switched"]),
                }
                for m in state["monitor_log"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"checkpoint: corrupt SSD schedule state ({e})") from e
        if not history or history[0].start != 0 or history[-1].end is not None:
            raise UserError("checkpoint: corrupt SSD schedule state (bad phase history)")
        if (history[-1].phase == SPARSE) != (sparse_end is not None):
            raise UserError("checkpoint: corrupt SSD schedule state (sparse end does not match phase)")
        saved = state.get("params", {})
        if saved != self._params():
            changed = sorted(k for k in self._params() if saved.get(k) != self._params()[k])
            warnings.warn(f"SSD schedule parameters changed since the checkpoint: {', '.join(changed)}")
        self._history = history
        if sparse_end is not None:  # a shorter run may have moved the final-dense boundary
            sparse_end = max(min(int(sparse_end), self.final_dense_start), last_step, history[-1].start)
        self._sparse_end = sparse_end
        self._last_step = last_step
        self.monitor_log = log
