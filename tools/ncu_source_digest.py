"""Where a warp-specialised kernel's warps wait, from Nsight Compute's source page (per SASS instruction warp-stall
sampling): the kernel's code cut into regions at its `USETMAXREG` instructions (each partition of a Gluon
warp_specialize sets its registers where its code starts), and per region its share of all samples, the largest
stall reasons, what it issues (HGMMA: a consumer; LDGSTS: a cp.async loader; UTMALDG: a TMA loader) and how often its
most frequent instruction ran; then the instructions with the most samples. docs/kernels.md v40 made
benchmarks/results/ncu_h100_2026-12-07_s46_8b_wgrad_source.txt this way:

    ncu --clock-control none --profile-from-start off --kernel-name regex:wgrad_ws --launch-count 1 \\
        --section SourceCounters --section WarpStateStats --import-source no -o wgrad \\
        python3 tools/bench_kernels.py --once --shapes 8b --activations relu --no-variants --launches wgrad_dw1
    ncu --import wgrad.ncu-rep --page source --csv --print-source sass > wgrad_sass.csv
    python3 tools/ncu_source_digest.py wgrad_sass.csv --top 20

A sample is one warp's state at one moment, so a region's share counts its warps too (a region run by one warp of
sixteen holds at most 1/16 of the samples however long it waits); compare a region's reasons with its own total.
"""
import argparse
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
UNITS = ("HGMMA", "LDGSTS", "UTMALDG", "UTMAREDG", "UTMASTG", "RED", "ATOM")  # opcodes a region's role shows in


def read(path: str):
    """The source page's instructions: (offset from the first instruction, SASS text, samples, executions,
    {stall reason: samples})."""
    with open(path, newline="") as fh:
        lines = list(csv.reader(fh))
    head = next((i for i, r in enumerate(lines) if SAMPLES in r and "Address" in r), None)
    if head is None:
        raise SystemExit(f"error: {path}: no ncu source page in it (expected a header with 'Address' and "
                         f"'{SAMPLES}': ncu --import R --page source --csv --print-source sass)")
    hdr = lines[head]
    ai, si, wi, ei = (hdr.index(k) for k in ("Address", "Source", SAMPLES, "Instructions Executed"))
    stalls = [(i, h[len("stall_"):]) for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    num = lambda v: float(v.replace(",", "")) if v not in ("", "-") else 0.0  # noqa: E731
    body = [r for r in lines[head + 1:] if len(r) == len(hdr)]
    if not body:
        raise SystemExit(f"error: {path}: the source page has no instructions")
    base = int(body[0][ai], 16)
    return [(int(r[ai], 16) - base, r[si].strip(), num(r[wi]), num(r[ei]), {n: num(r[i]) for i, n in stalls})
            for r in body]


def regions(rows):
    """The rows cut before each USETMAXREG instruction: [(first offset, rows)]."""
    out = []
    for row in rows:
        if not out or "USETMAXREG" in row[1]:
            out.append((row[0], []))
        out[-1][1].append(row)
    return out


def _opcode(sass: str) -> str:
    """The instruction's opcode (after its predicate, if any)."""
    words = sass.split()
    return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


def _reasons(rows, total: float, n: int) -> str:
    sums: dict = {}
    for row in rows:
        for k, v in row[4].items():
            sums[k] = sums.get(k, 0.0) + v
    top = sorted(sums.items(), key=lambda kv: -kv[1])[:n]
    return " ".join(f"{k} {100 * v / total:.1f}%" for k, v in top if v > 0)


def digest(rows, top: int) -> list:
    """The report's lines: a line per region with samples (`regions`), then the `top` instructions by samples."""
    total = sum(r[2] for r in rows) or 1.0
    out = [f"{len(rows)} instructions, {total:.0f} samples; regions (cut at USETMAXREG): share of all samples, the "
           f"largest stall reasons (% of all), what the region issues, its most frequent instruction's executions"]
    for start, rs in regions(rows):
        share = sum(r[2] for r in rs)
        if share < 0.001 * total:
            continue
        ops = {_opcode(r[1]) for r in rs}
        units = ",".join(u for u in UNITS if any(op.split(".")[0] == u for op in ops)) or "-"
        out.append(f"  {start:6x}  {100 * share / total:5.1f}%  {_reasons(rs, total, 3):48s} {units:22s} "
                   f"x{max(r[3] for r in rs):.0f}")
    out.append(f"top {top} instructions: offset, share, executions, SASS, largest stall reasons")
    for r in sorted(rows, key=lambda r: -r[2])[:top]:
        out.append(f"  {r[0]:6x}  {100 * r[2] / total:5.1f}%  x{r[3]:<9.0f} {r[1][:64]:64s} {_reasons([r], total, 2)}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=20, help="instructions to list (most samples first)")
    args = ap.parse_args()
    print("\n".join(digest(read(args.csv), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
