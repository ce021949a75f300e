"""Does a 2-CTA cluster with the weight tiles multicast by TMA make the expert GEMM faster? (docs/kernels.md v39,
§4's former first item: the fused forward and up_bwd read each expert's W through L2 once per 128-row tile.)

A stand-alone probe, not a backend kernel: the expert GEMM of up_bwd's first pass at 8B without its gather,
C[r] = A[r] @ W[e]^T for sorted rows r of expert e (ROWS rows per expert, contiguous), in Gluon with a plain
software pipeline (STAGES slots, one wgmma in flight), timed three ways in one process:

- `cta1`: one CTA per 128-row tile, A and W by TMA (each tile reads its expert's whole W through L2);
- `cta2`: the same code in 2-CTA clusters of 256 rows, each CTA loading its own A rows and the cluster's first CTA
  loading each W tile once, multicast into both CTAs' shared memory (half the W traffic through L2). A slot is
  refilled once both CTAs' wgmmas have read it: each arrives on a barrier of the pair that the first CTA waits on;
- `torch`: torch.bmm over the experts (cuBLAS), the dense-GEMM reference.

    python tools/probe_multicast.py [--experts 64] [--rows 4096] [--k 4096] [--n 256] [--out probe.json]
    python tools/probe_multicast.py --offline     # compile both forms for sm_90 here and report their resources

Checks both Gluon forms against torch (bf16 output, fp32 accumulation) before timing. Needs Triton >= 3.9.

H100, session 45 (docs/kernels.md v39; `probe_multicast_h100_2026-12-07_s45*.json`): cta1 0.91-0.96 ms (573-604
TF/s), cta2 0.96-1.00 (551-572), torch 0.85-0.86 (636-645); Nsight Compute: 6.46 against 5.98 GB through L2 (not
the 2.1 GB less that halving W would give), 83% of L2 throughput in both. Multicast did not pay here.
"""
import argparse
import datetime
import json
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CTA_ROWS = 128


@gluon.jit
def _expert_gemm(a_desc, w_desc, c_ptr, K, ROWS, N, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_shape[0]   # the cluster's rows: 128 per CTA
    BK: gl.constexpr = a_desc.block_shape[1]
    BN: gl.constexpr = w_desc.block_shape[0]
    PAIR: gl.constexpr = gl.num_ctas() == 2
    CGA: gl.constexpr = [[1, 0]] if PAIR else []
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BN, 16], cga_layout=CGA)
    row0 = gl.program_id(0) * BM
    w_row0 = (row0 // ROWS) * N                 # the expert's first weight row
    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_shape, a_desc.layout)
    w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_shape, w_desc.layout)
    ready = mbarrier.allocate_mbarrier(batch=STAGES)                # each CTA's own
    empty = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=PAIR)  # the pair's: both arrive, the first waits
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    nk = gl.cdiv(K, BK)
    for s in gl.static_range(STAGES - 1):
        mbarrier.expect(ready.index(s), a_desc.nbytes_per_cta + w_desc.nbytes_per_cta)
        tma.async_load(a_desc, [row0, s * BK], ready.index(s), a_s.index(s))
        tma.async_load(w_desc, [w_row0, s * BK], ready.index(s), w_s.index(s), multicast=PAIR)
    acc = gl.zeros([BM, BN], gl.float32, acc_layout)
    for k in range(nk):
        slot = k % STAGES
        mbarrier.wait(ready.index(slot), (k // STAGES) & 1)
        acc = warpgroup_mma(a_s.index(slot), w_s.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        prev = (k + STAGES - 1) % STAGES       # the slot of step k - 1, whose wgmma is now done
        if k > 0:
            mbarrier.arrive(empty.index(prev))
        nxt = k + STAGES - 1
        if nxt < nk:
            # the slot's last reader was step k - 1: both CTAs' arrivals (the first CTA waits for them)
            mbarrier.wait(empty.index(prev), ((k - 1) // STAGES) & 1, pred=k > 0)
            mbarrier.expect(ready.index(prev), a_desc.nbytes_per_cta + w_desc.nbytes_per_cta)
            tma.async_load(a_desc, [row0, nxt * BK], ready.index(prev), a_s.index(prev))
            tma.async_load(w_desc, [w_row0, nxt * BK], ready.index(prev), w_s.index(prev), multicast=PAIR)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    rows = row0 + gl.arange(0, BM, gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, BN, gl.SliceLayout(0, acc_layout))
    gl.store(c_ptr + rows.to(gl.int64)[:, None] * BN + cols[None, :], acc.to(c_ptr.dtype.element_ty))
    gl.barrier(cluster=True)  # no CTA of the pair leaves while the other may still arrive on its barriers


def launch(a, w, c, rows_per_expert: int, ctas: int, stages: int = 4, bk: int = 64, warps: int = 8):
    n = w.shape[0] // (a.shape[0] // rows_per_expert)
    bm = CTA_ROWS * ctas
    la = gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16, cga_layout=[[1, 0]] if ctas == 2 else [])
    lw = gl.NVMMASharedLayout.get_default_for([n, bk], gl.bfloat16, cga_layout=[[0, 0]] if ctas == 2 else [])
    ad = TensorDescriptor.from_tensor(a, [bm, bk], la)
    wd = TensorDescriptor.from_tensor(w, [n, bk], lw)
    return _expert_gemm[(a.shape[0] // bm,)](ad, wd, c, a.shape[1], rows_per_expert, n, STAGES=stages,
                                             num_warps=warps, num_ctas=ctas)


def _offline():
    import compile_report as cr
    cr.offline(90)
    a = torch.empty(2 * 512, 512, dtype=torch.bfloat16)
    w = torch.empty(2 * 256, 512, dtype=torch.bfloat16)
    c = torch.empty(2 * 512, 256, dtype=torch.bfloat16)
    out = {}
    for ctas in (1, 2):
        kern = launch(a, w, c, 512, ctas)
        out[f"cta{ctas}"] = dict(cr.report(kern, 8), multicast=kern.asm["ptx"].count("multicast::cluster"))
    print("OFFLINE " + json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4096, help="rows per expert (a multiple of 256)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=256, help="weight rows per expert (the GEMM's N)")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.offline:
        _offline()
        return 0
    E, R, K, N = args.experts, args.rows, args.k, args.n
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(E * R, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(E * N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    want = torch.bmm(a.view(E, R, K), w.view(E, N, K).transpose(1, 2)).reshape(E * R, N)
    arms = {"cta1": lambda c: launch(a, w, c, R, 1, args.stages), "cta2": lambda c: launch(a, w, c, R, 2, args.stages),
            "torch": lambda c: torch.bmm(a.view(E, R, K), w.view(E, N, K).transpose(1, 2), out=c.view(E, R, N))}
    out = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "triton": triton.__version__, "experts": E, "rows": R, "k": K, "n": N, "stages": args.stages,
           "tflop": 2 * E * R * K * N / 1e12, "errors": {}, "rounds": []}
    for name, fn in arms.items():
        c = torch.zeros_like(want)
        fn(c)
        torch.cuda.synchronize()
        out["errors"][name] = float((c.float() - want.float()).abs().max() / want.float().abs().max())
        print(f"{name}: max error / max |C| {out['errors'][name]:.2e}")
    c = torch.empty_like(want)
    for r in range(3):
        times = {}
        for name, fn in list(arms.items())[r % 3:] + list(arms.items())[:r % 3]:
            fn(c)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            for _ in range(args.iters):
                fn(c)
            ev[1].record()
            torch.cuda.synchronize()
            times[name] = ev[0].elapsed_time(ev[1]) / args.iters
        out["rounds"].append(times)
        print(f"round {r}: " + "  ".join(f"{k} {v:.3f} ms ({out['tflop'] / v * 1e3:.0f} TF/s)"
                                         for k, v in times.items()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
