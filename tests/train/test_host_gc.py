"""HostGC: automatic collection off inside, young generations collected every `interval` steps, Python's
state restored after (also when interval is 0, which changes nothing)."""
import gc

from ssd_megatron.train import host_gc as hg


def test_collects_every_interval_and_restores(monkeypatch):
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(hg.gc, "collect", lambda *a: calls.append(a) or real_collect(*a))
    assert gc.isenabled()
    with hg.HostGC(3) as h:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        calls.clear()
        for step in range(7):
            h.step(step)
        assert calls == [(1,), (1,)]  # after steps 2 and 5
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_interval_zero_leaves_python_alone():
    with hg.HostGC(0) as h:
        assert gc.isenabled()
        h.step(0)
    assert gc.isenabled()
