"""tools/ncu_source_digest.py: a warp-specialised kernel's stall samples per partition (regions cut at USETMAXREG)
from Nsight Compute's source page (docs/kernels.md v40), run as the program it is on a CSV in ncu's layout."""
import os
import subprocess
import sys

from .test_offline_compile import ROOT

TOOL = os.path.join(ROOT, "tools", "ncu_source_digest.py")
HEAD = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
        '"Instructions Executed","stall_barrier","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"')


def _row(addr: int, sass: str, samples: int, execs: int, barrier: int = 0, long_sb: int = 0, wait: int = 0) -> str:
    return f'"{hex(0x7f0000 + addr)}","      {sass}","{samples}","{samples}","{execs:,}","{barrier}","{long_sb}",' \
           f'"{wait}","{long_sb}"'


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=60)


def test_regions_and_top_instructions(tmp_path):
    lines = ['"Kernel Name","wgrad_ws_kernel",', HEAD,
             _row(0x0, "LDC R1, c[0x0][0x28]", 0, 2048),
             _row(0x10, "USETMAXREG.DEALLOC.CTAPOOL 0xd8", 0, 512),           # consumer
             _row(0x20, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24", 10, 5000, wait=10),
             _row(0x30, "@!P0  BRA 0x7f0100", 30, 5000, long_sb=30),
             _row(0x40, "USETMAXREG.DEALLOC.CTAPOOL 0x38", 0, 512),           # cp.async loader
             _row(0x50, "LDGSTS.E.BYPASS.128 desc[UR36][R16.64], P3, [R51]", 20, 5000, long_sb=5, wait=15),
             _row(0x60, "@!P6  BRA 0x7f0200", 40, 5000, barrier=40)]
    path = tmp_path / "src.csv"
    path.write_text("\n".join(lines) + "\n")
    r = _run(str(path), "--top", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("7 instructions, 100 samples")
    regions = [ln.split() for ln in out[1:4]]
    # (the first instruction's region has no samples: left out)
    assert [x[:2] for x in regions[:2]] == [["10", "40.0%"], ["40", "60.0%"]], out
    assert "long_sb 30.0% wait 10.0%" in out[1] and out[1].split()[-2:] == ["HGMMA", "x5000"], out[1]
    assert "barrier 40.0% wait 15.0% long_sb 5.0%" in out[2] and out[2].split()[-2:] == ["LDGSTS", "x5000"], out[2]
    assert out[3].startswith("top 2 instructions")
    assert [ln.split()[:2] for ln in out[4:]] == [["60", "40.0%"], ["30", "30.0%"]], out


def test_names_a_file_without_a_source_page(tmp_path):
    path = tmp_path / "details.csv"
    path.write_text('"ID","Kernel Name","Metric Name","Metric Value"\n"0","k","gpu__time_duration.sum","1"\n')
    r = _run(str(path))
    assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {path}: no ncu source page in it"), r.stderr
