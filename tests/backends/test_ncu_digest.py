"""tools/ncu_digest.py: one line per kernel from the CSV that `ncu --csv --metrics` prints (docs/kernels.md v38), run as
the program it is, on a CSV in ncu's layout with the profiled program's own output and ncu's notes mixed in."""
import os
import subprocess
import sys

from .test_offline_compile import ROOT

TOOL = os.path.join(ROOT, "tools", "ncu_digest.py")
HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _row(kid: int, name: str, metric: str, value: str) -> str:
    return (f'"{kid}","916","python3.12","127.0.0.1","{name}","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0",'
            f'"Command line profiler metrics","{metric}","","{value}"')


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60)


def test_digest_one_line_per_kernel(tmp_path):
    lines = ["==PROF== Connected to process 916", "round 0 dense        fwd 5.8610 ms", HEAD,
             _row(0, "down_ws_kernel", "gpu__time_duration.sum", "1,417,824"),
             _row(0, "down_ws_kernel", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "40.65"),
             _row(1, "wgrad_ws_kernel", "gpu__time_duration.sum", "1,162,592"),
             _row(1, "wgrad_ws_kernel", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "58.04"),
             "==PROF== Disconnected from process 916"]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    r = _run(str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0 down_ws_kernel dram__throughput=40.65 gpu__time_duration=1,417,824",
                                     "1 wgrad_ws_kernel dram__throughput=58.04 gpu__time_duration=1,162,592"]
    assert _run(str(path), "--last", "1").stdout.splitlines() == [r.stdout.splitlines()[1]]


def test_digest_names_a_file_without_a_metric_table(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("==PROF== Connected to process 1\nno csv here\n")
    r = _run(str(path))
    assert r.returncode == 1 and r.stderr.strip() == f"error: {path}: no ncu --csv metric table in it (expected a " \
                                                      "header with 'Metric Name')", r.stderr
