"""CLI contract: UserError -> `error: <one line>` on stderr, exit status 2, no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_megatron import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, needle", [
    (["configs/gpt_tiny.yaml", "train.max_stpes=3"], "did you mean 'max_steps'"),
    (["configs/gpt_tiny.yaml", "train.max_steps=abc"], "integer"),
    (["configs/gpt_tiny.yaml", "optim.lr=-1"], "out of range"),
    (["configs/missing.yaml"], "not found"),
    (["configs/gpt_tiny.yaml", "train.max_steps"], "key=value"),
    (["configs/gpt_tiny.yaml", "parallel.tensor_model_parallel_size=2", "method=dense"], "not supported yet"),
    (["configs/gpt_tiny.yaml", "--bogus"], "unknown option"),
])
def test_train_user_errors_exit_2(args, needle, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli.train_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "Traceback" not in "\n".join(err)


def test_eval_missing_target_exit_2(tmp_path, capsys):
    code = cli.eval_main([str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_report_missing_run_exit_2(tmp_path, capsys):
    code = cli.report_main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "metrics.jsonl" in err[0]


def test_split_train_args():
    assert cli.split_train_args([]) == (None, [])
    assert cli.split_train_args(["a.yaml", "x.y=1"]) == ("a.yaml", ["x.y=1"])
    assert cli.split_train_args(["method=dense"]) == (None, ["method=dense"])


def test_python_dash_m_no_traceback():
    """The real entry point in a fresh interpreter: exit code 2, one line, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "ssd_megatron", "train", "configs/gpt_tiny.yaml", "trian.max_steps=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did you mean 'train'" in lines[0]
    assert p.stdout.strip() == ""
