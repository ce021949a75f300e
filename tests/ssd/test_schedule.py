"""SSD phase schedule: paper appendix C example, final-dense rule, resume, random policy, validation."""
import json

import pytest

from ssd_megatron.errors import UserError
from ssd_megatron.ssd.schedule import PhaseSchedule

APPENDIX_C = dict(monitor_interval=3000, threshold=0.9, sparse_ratio=0.5, final_dense_ratio=0.1)


def run(sched, ari_at, start=0, end=None, log=None):
    """Drive `sched` like the training loop; ari_at(step) gives the monitor's mean ARI."""
    end = sched.total_steps if end is None else end
    for t in range(start, end):
        sched.step(t)
        if sched.should_monitor(t):
            new = sched.observe(t, ari_at(t))
            if log is not None:
                log.append((t, new))
    return sched


def intervals(sched):
    return [(h.phase, h.start, h.end) for h in sched.history]


def appendix_c_ari(t):
    # below tau until the 6th monitor; after the first sparse phase the 1st monitor is below tau and
    # the 2nd above (twice); afterwards every first monitor is above tau.
    high = {18000, 46500, 60000}
    return 0.95 if (t in high or t >= 70500) else 0.6


def test_appendix_c_worked_example():
    s = run(PhaseSchedule(100_000, **APPENDIX_C), appendix_c_ari)
    assert s.sparse_per_dense == pytest.approx(1.25)
    assert intervals(s)[:8] == [
        ("dense", 0, 18000),  # tau crossed at the 6th monitor of 3 000 steps
        ("sparse", 18000, 40500),  # 18 000 x 1.25 = 22 500
        ("dense", 40500, 46500),  # two monitors: 43 500 (below), 46 500 (above)
        ("sparse", 46500, 54000),  # 6 000 x 1.25 = 7 500
        ("dense", 54000, 60000),
        ("sparse", 60000, 67500),  # the second 7 500
        ("dense", 67500, 70500),  # one monitor after returning to dense
        ("sparse", 70500, 74250),  # 3 000 x 1.25 = 3 750
    ]
    monitors = [m["step"] for m in s.monitor_log]
    assert monitors[:6] == [3000, 6000, 9000, 12000, 15000, 18000]
    assert 43500 in monitors and 42000 not in monitors and 45000 not in monitors
    # three lengths of sparse phases, as in Figure 6
    lengths = [e - b for p, b, e in intervals(s) if p == "sparse"]
    assert lengths[:3] == [22500, 7500, 7500] and set(lengths[3:]) == {3750}
    # the last 10% is dense
    assert s.final_dense_start == 90_000
    assert all(e <= 90_000 for p, b, e in intervals(s) if p == "sparse")
    assert s.phase_at(99_999) == "dense" and s.current_phase == "dense"


def test_final_dense_truncates_sparse_and_blocks_switches():
    s = PhaseSchedule(40_000, monitor_interval=1000, threshold=0.5, sparse_ratio=0.5, final_dense_ratio=0.25)
    assert s.final_dense_start == 30_000
    run(s, lambda t: 0.0 if t < 20_000 else 1.0)
    # dense 20 000 would give 33 333 sparse steps; cut at 30 000
    assert intervals(s) == [("dense", 0, 20_000), ("sparse", 20_000, 30_000), ("dense", 30_000, None)]
    assert not any(s.should_monitor(t) for t in range(30_000, 40_000))
    assert s.sparse_steps(40_000) == 10_000


def test_no_switch_inside_final_phase_even_if_monitor_would_fall_there():
    s = PhaseSchedule(10_000, monitor_interval=1000, threshold=0.5, sparse_ratio=0.3, final_dense_ratio=0.15)
    run(s, lambda t: 0.0)
    assert intervals(s) == [("dense", 0, None)]
    assert [m["step"] for m in s.monitor_log] == list(range(1000, 8500, 1000))


def test_threshold_strict_and_none_never_switches():
    s = PhaseSchedule(100, monitor_interval=10, threshold=0.9, sparse_ratio=0.2, final_dense_ratio=0.0)
    s.step(10)
    assert s.observe(10, None) is None
    s.step(20)
    assert s.observe(20, 0.9) is None  # needs ARI > tau
    s.step(30)
    assert s.observe(30, 0.90001) == "sparse"
    assert s.current_phase == "sparse"
    # T = round(0.2/0.8 * 30) = round(7.5) = 8 (round half up)
    assert s.history[-1].end == 38
    assert s.step(37) is None and s.phase_at(37) == "sparse"
    assert s.step(38) == "dense"
    assert s.should_monitor(48) and not s.should_monitor(40) and not s.should_monitor(38)


def test_phase_at_past_and_planned():
    s = run(PhaseSchedule(100_000, **APPENDIX_C), appendix_c_ari, end=20_000)
    assert s.phase_at(0) == "dense" and s.phase_at(17_999) == "dense"
    assert s.phase_at(18_000) == "sparse" and s.phase_at(40_499) == "sparse"
    assert s.phase_at(40_500) == "dense"  # planned end of the pending sparse phase
    assert s.phase(19_000) == "sparse"
    assert s.next_monitor(20_000) == 43_500
    with pytest.raises(ValueError):
        s.phase_at(-1)


def test_observe_outside_monitor_steps_and_time_going_backwards():
    s = PhaseSchedule(10_000, monitor_interval=100)
    with pytest.raises(ValueError):
        s.observe(150, 1.0)
    s.step(200)
    with pytest.raises(ValueError):
        s.step(199)
    s.observe(200, 0.1)
    with pytest.raises(ValueError, match="already"):
        s.observe(200, 0.1)


@pytest.mark.parametrize("cut", [17_999, 18_000, 18_001, 30_000, 40_500, 44_000, 46_500, 71_000, 95_000])
def test_state_dict_round_trip_continues_identically(cut):
    full_log = []
    full = run(PhaseSchedule(100_000, **APPENDIX_C), appendix_c_ari, log=full_log)

    part_log = []
    first = run(PhaseSchedule(100_000, **APPENDIX_C), appendix_c_ari, end=cut, log=part_log)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = PhaseSchedule(100_000, **APPENDIX_C)
    resumed.load_state_dict(state)
    assert resumed.current_phase == first.current_phase
    run(resumed, appendix_c_ari, start=cut, log=part_log)
    assert part_log == full_log
    assert intervals(resumed) == intervals(full)
    assert resumed.state_dict() == full.state_dict()


def test_load_state_dict_rejects_corrupt_state_and_warns_on_changed_params():
    s = run(PhaseSchedule(100_000, **APPENDIX_C), appendix_c_ari, end=20_000)
    state = s.state_dict()
    bad = dict(state, history=[["dense", 5, None]])
    with pytest.raises(UserError, match="schedule"):
        PhaseSchedule(100_000, **APPENDIX_C).load_state_dict(bad)
    with pytest.raises(UserError):
        PhaseSchedule(100_000, **APPENDIX_C).load_state_dict({"version": 1})
    shorter = PhaseSchedule(30_000, **APPENDIX_C)  # final dense now starts at 27 000
    with pytest.warns(UserWarning, match="total_steps"):
        shorter.load_state_dict(state)
    assert shorter.history[-1].end == 27_000


def test_random_policy_deterministic_per_seed():
    def decisions(seed):
        s = PhaseSchedule(200_000, monitor_interval=1000, sparse_ratio=0.5, final_dense_ratio=0.1,
                          policy="random", seed=seed)
        log = []
        run(s, lambda t: None, log=log)  # ARI is ignored by the random policy
        return intervals(s), log

    a, b = decisions(7), decisions(7)
    assert a == b
    assert decisions(8) != a
    switched = [new for _, new in a[1]]
    # about half the monitors switch
    assert 0.3 < sum(x == "sparse" for x in switched) / len(switched) < 0.7
    # sparse length still follows the r / (1 - r - l) rule
    hist = a[0]
    for i, (phase, b0, e0) in enumerate(hist):
        if phase == "sparse" and e0 < 180_000:
            assert e0 - b0 == round(1.25 * (hist[i - 1][2] - hist[i - 1][1]))


def test_random_policy_resume():
    kw = dict(monitor_interval=500, policy="random", seed=3)
    full = run(PhaseSchedule(50_000, **kw), lambda t: None)
    first = run(PhaseSchedule(50_000, **kw), lambda t: None, end=12_345)
    resumed = PhaseSchedule(50_000, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(resumed, lambda t: None, start=12_345)
    assert intervals(resumed) == intervals(full)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(threshold=1.5), "ssd.threshold"),
        (dict(threshold=-0.1), "ssd.threshold"),
        (dict(threshold="0.9"), "ssd.threshold"),
        (dict(sparse_ratio=0.0), "ssd.sparse_ratio"),
        (dict(sparse_ratio=1.0), "ssd.sparse_ratio"),
        (dict(final_dense_ratio=1.0), "ssd.final_dense_ratio"),
        (dict(final_dense_ratio=-0.1), "ssd.final_dense_ratio"),
        (dict(sparse_ratio=0.6, final_dense_ratio=0.4), "ssd.sparse_ratio + ssd.final_dense_ratio"),
        (dict(monitor_interval=0), "ssd.monitor_interval"),
        (dict(monitor_interval=2.5), "ssd.monitor_interval"),
        (dict(policy="sometimes"), "ssd.switch_policy"),
        (dict(total_steps=0), "train.max_steps"),
    ],
)
def test_validation_names_the_key(kwargs, key):
    args = dict(total_steps=1000, monitor_interval=100, threshold=0.9, sparse_ratio=0.5, final_dense_ratio=0.1)
    args.update(kwargs)
    with pytest.raises(UserError) as e:
        PhaseSchedule(**args)
    assert key in str(e.value) and "\n" not in str(e.value)
