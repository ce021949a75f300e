"""tools/step_times.py: per-phase step times of finished runs from their metrics.jsonl."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import step_times  # noqa: E402


def _write_run(run_dir, phases, step_time):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"kind": "valid", "step": 0, "valid_loss": 1.0}) + "\n")
        for step, phase in enumerate(phases):
            rec = {"kind": "train", "step": step, "phase": phase, "step_time": step_time(step, phase),
                   "tokens_per_s": 1000.0 / step_time(step, phase)}
            fh.write(json.dumps(rec) + "\n")


def test_each_phase_segment_drops_its_first_steps(tmp_path):
    """SSD's dense -> sparse -> dense: every segment's first --skip steps (compile, warm-up, capture) are dropped,
    the medians are of the rest, in ms."""
    phases = ["dense"] * 6 + ["sparse"] * 5 + ["dense"] * 4
    slow = {0, 1, 6, 7, 11, 12}  # the first two steps of each segment

    def step_time(step, phase):
        return 5.0 if step in slow else (0.040 if phase == "dense" else 0.030)

    _write_run(tmp_path / "run", phases, step_time)
    out = tmp_path / "steps.json"
    assert step_times.main([f"graph={tmp_path / 'run'}", "--skip", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    dense, sparse = res["runs"]["graph"]["dense"], res["runs"]["graph"]["sparse"]
    assert dense["n"] == 4 + 2 and sparse["n"] == 3 and sparse["steps"] == [8, 10]
    assert dense["ms_per_step"] == pytest.approx(40.0) and sparse["ms_per_step"] == pytest.approx(30.0)
    assert res["skip"] == 2 and "gpu" in res and "date" in res


def test_bad_arguments_and_runs_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="LABEL=RUN_DIR"):
        step_times.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="metrics.jsonl: no train records"):
        step_times.main([f"a={tmp_path}"])
