"""What the sparse layer's combines cost without their GEMMs (docs/kernels.md §1 and v36): the floor of down for dx
(and of the fused forward's down into y), each of the T·K expert rows added into its token's row of a [T, D] output.

Cases, each one launch per call (`tools/bench_routing.py`'s `time_cases`: one CUDA graph of 8 calls over rotating
routings and outputs, replayed 100 times, the median in µs per call):

- `adds, expert order`: the combine as dx does it. A Triton kernel walks the rows in expert order (the routing
  plan's stable sort: each expert's tokens ascending), one program per (row tile, column block), a row tile's column
  blocks side by side, and adds each row's values, computed in registers (no GEMM, no operand reads), into the
  token's row with relaxed atomic adds;
- `adds, token order`: the same adds with each token's K rows next to each other, the order that keeps a row's
  K adds in L2 (and that the GEMMs cannot take: their weights would then miss L2, docs/kernels.md v12);
- `adds, token windows of 16 experts`: the order the WS dx takes its 128-row tiles in at 8B since v37
  (`token_window_tiles`, groups of 16 experts), each tile's rows in turn: the floor of dx as it runs now;
- `stores, expert order`: the other way to combine: each row written to its own (t, k) row of a [T·K, D] buffer
  (plain stores), then `K-sum (torch)`, the buffer summed over k into [T, D];
- `index_add_ (torch)`: torch's scatter-add of a materialised [T·K, D] rows tensor, expert order, for scale;
- `adds, expert order, n SMs`: the first case's adds from n persistent programs, one per SM (`SMS`): if the time
  follows 1/n, what bounds the adds is each SM's issue or wait; if it stays flat, a shared limit (L2, DRAM).

Each record gives µs and the payload's rate (the T·K·D values added or stored, in GB/s of the output's dtype), and
the first case records the atomic instructions its PTX holds (the vector width of each add). On CPU, `--check`
runs the kernel under TRITON_INTERPRET=1 at a small size against torch's index_add_
(tests/backends/test_bench_combine.py).

    python tools/bench_combine.py [--shapes base,8b] [--out combine.json]
"""
import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_routing import SETS, SHAPES, run, time_cases  # noqa: E402
from ssd_megatron.ffn.backends.kernels.tile_order import AUTO_GROUP, token_window_tiles  # noqa: E402
from ssd_megatron.ffn.backends.routing import make_plan  # noqa: E402

BM, BN, WARPS = 64, 64, 4  # a row tile, a column block of 64 values (128 bytes of bf16, dx's WS block width)
SMS_BM, SMS_WARPS = 512, 32  # the persistent form: 1024 threads of > 32 registers each, so one program per SM
SMS = (33, 66, 132)  # SM counts of the persistent form (v35's split gave dx 33, 44 or 66 of the H100's 132)

_KERNEL = {}


def _kernel():
    """The adds (or stores) kernel, defined on first use so that TRITON_INTERPRET set by a caller applies."""
    if "k" not in _KERNEL:
        import triton
        import triton.language as tl

        @triton.jit
        def combine_kernel(OUT, DST, M, D, stride, ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
            num_n = tl.cdiv(D, BN)
            for item in range(tl.program_id(0), tl.cdiv(M, BM) * num_n, tl.num_programs(0)):
                tile = item // num_n  # a row tile's column blocks are neighbouring items, as in dx
                n = item % num_n
                rows = tile * BM + tl.arange(0, BM)
                cols = n * BN + tl.arange(0, BN)
                rmask = rows < M
                dst = tl.load(DST + rows, mask=rmask, other=0).to(tl.int64) * stride
                val = ((rows[:, None] * 3 + cols[None, :]) % 5).to(tl.float32)  # small integers: exact in bf16
                ptrs = OUT + dst[:, None] + cols[None, :]
                mask = rmask[:, None] & (cols < D)[None, :]
                if ATOMIC:
                    tl.atomic_add(ptrs, val.to(OUT.dtype.element_ty), mask=mask, sem="relaxed")
                else:
                    tl.store(ptrs, val.to(OUT.dtype.element_ty), mask=mask)

        _KERNEL["k"] = combine_kernel
    return _KERNEL["k"]


def combine(out: torch.Tensor, dst: torch.Tensor, atomic: bool = True, sms: int = 0):
    """Row r's values ((3r + c) mod 5 in column c) added (`atomic`) or stored into out[dst[r]]; returns the compiled
    kernel's handle. One program per (row tile, column block), or with `sms` that many persistent programs of
    SMS_WARPS warps each, one per SM (their registers leave room for one), walking the same items in turn."""
    M, D = dst.numel(), out.shape[1]
    if sms:
        return _kernel()[(sms, )](out, dst, M, D, out.stride(0), ATOMIC=atomic, BM=SMS_BM, BN=BN, num_warps=SMS_WARPS)
    grid = (-(-M // BM) * -(-D // BN), )
    return _kernel()[grid](out, dst, M, D, out.stride(0), ATOMIC=atomic, BM=BM, BN=BN, num_warps=WARPS)


def reference(T: int, D: int, dst: torch.Tensor, dtype) -> torch.Tensor:
    """What `combine(zeros(T, D), dst)` adds, by torch's index_add_ in float32."""
    r = torch.arange(dst.numel(), device=dst.device)[:, None]
    c = torch.arange(D, device=dst.device)[None, :]
    vals = ((r * 3 + c) % 5).float()
    return torch.zeros(T, D, device=dst.device).index_add_(0, dst.long(), vals).to(dtype)


def window_rows(plan, bm: int = 128, group: int = AUTO_GROUP) -> torch.Tensor:
    """The plan's sorted rows in the order of its M-tiles of `bm` rows in token windows of `group` experts
    (`token_window_tiles`, as the WS dx takes them at 8B), each tile's rows ascending; every row once."""
    tiles = token_window_tiles(plan.offsets, plan.num_rows, plan.num_experts, bm, group).long()
    rows = tiles[:, 1:] + torch.arange(bm, device=tiles.device)
    return rows[rows < plan.offsets.long()[tiles[:, :1] + 1]]  # (empty tiles start at M = the last offset)


def routings(T: int, N: int, K: int, device, sets: int = SETS, seed: int = 0) -> list:
    """`sets` random top-K routings as the routing plan orders them (`make_plan`: each expert's tokens ascending):
    for each, the token of every sorted row, its (t, k) pair index, and the tokens of the rows in `window_rows`'
    order."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    plans = [make_plan(torch.rand(T, N, generator=g).topk(K, dim=1).indices.to(device), N) for _ in range(sets)]
    return [(p.token, p.order, p.token[window_rows(p)]) for p in plans]


def atomic_ops(kernel) -> list:
    """The distinct atomic/reduction opcodes in a compiled kernel's PTX (e.g. red.global.gpu.add.noftz.v4.bf16x2)."""
    ptx = kernel.asm.get("ptx", "") if hasattr(kernel, "asm") else ""
    return sorted(set(re.findall(r"\b(?:red|atom)\.[\w.]+", ptx)))


def bench_shape(shape: str) -> list:
    T, D, N, K, _ = SHAPES[shape]
    dev, dt = torch.device("cuda"), torch.bfloat16
    plans = routings(T, N, K, dev)
    outs = [torch.zeros(T, D, device=dev, dtype=dt) for _ in range(SETS)]
    token_order = torch.arange(T, device=dev, dtype=torch.int32).repeat_interleave(K)
    buf = torch.empty(T * K, D, device=dev, dtype=dt)
    rows = torch.randn(T * K, D, device=dev, dtype=dt)
    handle = combine(outs[0], plans[0][0])
    torch.testing.assert_close(outs[0], reference(T, D, plans[0][0], dt), rtol=0, atol=0)
    cases = {"adds, expert order": lambda i: combine(outs[i], plans[i][0]),
             "adds, token order": lambda i: combine(outs[i], token_order),
             f"adds, token windows of {AUTO_GROUP} experts": lambda i: combine(outs[i], plans[i][2]),
             "stores, expert order": lambda i: combine(buf, plans[i][1], atomic=False),
             "K-sum (torch)": lambda i: torch.sum(buf.view(T, K, D), dim=1, out=outs[i]),
             "index_add_ (torch)": lambda i: outs[i].index_add_(0, plans[i][0], rows)}
    for n in SMS:
        cases[f"adds, expert order, {n} SMs"] = lambda i, n=n: combine(outs[i], plans[i][0], sms=n)
    recs = time_cases(shape, cases)
    payload = T * K * D * torch.finfo(dt).bits // 8
    for r in recs:
        r["payload_gb_per_s"] = payload / (r["us"] * 1e-6) / 1e9 if r["name"] != "K-sum (torch)" else None
    recs[0]["atomic_ops"] = atomic_ops(handle)
    print(f"{shape:5s} atomic ops: {recs[0]['atomic_ops']}", flush=True)
    return recs


def check() -> int:
    """The kernel at a small size, interpreted on CPU (fp32) or compiled on a GPU (fp32 and bf16), against
    `reference`: exit 0 if equal."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --check without a GPU needs TRITON_INTERPRET=1 set before the command (triton reads it "
                 "when it loads)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    T, D, N, K = 37, 70, 5, 3  # rows and columns past one tile and block
    tok, pair, windows = routings(T, N, K, dev, sets=1)[0]
    assert torch.equal(windows.sort().values, tok.sort().values), "window_rows: not every row once"
    for dtype in (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32, ):  # the interpreter
        # has no bf16 atomic adds
        for sms in (0, 3):  # one program per item; three persistent programs
            out = torch.zeros(T, D, device=dev, dtype=dtype)
            combine(out, tok, sms=sms)
            torch.testing.assert_close(out, reference(T, D, tok, dtype), rtol=0, atol=0)
        buf = torch.zeros(T * K, D, device=dev, dtype=dtype)
        combine(buf, pair, atomic=False)
        want = torch.empty_like(buf)
        want[pair.long()] = reference(T * K, D, torch.arange(T * K, device=dev), dtype)
        torch.testing.assert_close(buf, want, rtol=0, atol=0)
    print("ok")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="base,8b")
    ap.add_argument("--out", default="")
    ap.add_argument("--check", action="store_true", help="check the kernel against torch at a small size and exit")
    args = ap.parse_args()
    return check() if args.check else run("tools/bench_combine.py", bench_shape, args)


if __name__ == "__main__":
    sys.exit(main())
