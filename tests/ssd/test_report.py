"""The SSD run report's time section: per-phase step times (settling steps after each switch left out),
the sparse/dense ratio of time and of FLOPs, and the step-time plot."""
from ssd_megatron.ssd.report import phase_step_stats, ssd_sections, time_lines


def _records():
    """20 dense steps at 100 ms (the first 4 at 900 ms: compilation), 10 sparse at 60 ms (the first 4 after
    the switch at 500 ms: capture), 10 dense at 100 ms again (its first 4 at 700 ms); a validation record."""
    recs = []
    for step in range(40):
        phase = "sparse" if 20 <= step < 30 else "dense"
        start = {0: 0, 20: 20, 30: 30}[max(s for s in (0, 20, 30) if s <= step)]
        slow = {0: 0.9, 20: 0.5, 30: 0.7}[start]
        t = slow if step - start < 4 else (0.06 if phase == "sparse" else 0.1)
        recs.append({"kind": "train", "step": step, "phase": phase, "loss": 3.0, "step_time": t,
                     "flops": 6e9 if phase == "sparse" else 1e10})
        if step == 25:
            recs.append({"kind": "valid", "step": step, "valid_ppl": 20.0})
    recs[20]["switch"] = "dense->sparse"
    recs[31]["switch"] = "sparse->dense"
    return recs


def test_phase_step_stats_leave_out_the_settling_steps():
    stats = phase_step_stats(_records())
    assert stats["dense"] == {"step_ms": 100.0, "steps": 16 + 6, "flops": 1e10}
    assert stats["sparse"] == {"step_ms": 60.0, "steps": 6, "flops": 6e9}


def test_time_line_names_both_ratios_and_flags_a_slower_sparse_phase():
    line, = time_lines(phase_step_stats(_records()))
    assert "dense 100.0 ms (22 steps), sparse 60.0 ms (6 steps)" in line
    assert "**0.60×** the dense steps' time for 0.60× their FLOPs" in line
    slow = [dict(r, step_time=0.2) if r.get("phase") == "sparse" else r for r in _records()]
    lines = time_lines(phase_step_stats(slow))
    assert "**2.00×**" in lines[0] and "no time saved in the sparse phase" in lines[1]
    assert time_lines(phase_step_stats([r for r in _records() if r.get("phase") != "sparse"])) == []


def test_ssd_sections_plot_the_step_time(tmp_path):
    lines = ssd_sections(_records(), tmp_path)
    assert any("sparse steps take **0.60×**" in ln for ln in lines)
    assert any("step_time.png" in ln for ln in lines) and (tmp_path / "step_time.png").stat().st_size > 0
