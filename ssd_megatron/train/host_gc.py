"""Python garbage collection on the host, at known steps only (`train.gc_interval`).

CPython's automatic collector runs whenever allocation counts cross its thresholds; a full collection
walks every tracked object — hundreds of thousands after torch.compile — and stalls the host for
milliseconds in the middle of a step, while the GPU waits for launches. As Megatron-LM (--manual-gc) and
torchtitan (gc_freq) do, the loop freezes what exists after start-up, turns the automatic collector
off, and collects the young generations every `interval` steps. interval 0 keeps Python's behaviour.
"""
from __future__ import annotations

import gc


class HostGC:
    def __init__(self, interval: int):
        self.interval = int(interval)
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.interval > 0:
            gc.collect()
            gc.freeze()  # objects alive now (modules, compiled graphs) are never scanned again
            gc.disable()

    def step(self, step: int) -> None:
        if self.interval > 0 and (step + 1) % self.interval == 0:
            gc.collect(1)

    def stop(self) -> None:
        if self.interval > 0:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()

    def __enter__(self) -> "HostGC":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
