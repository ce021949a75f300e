"""Micro-benchmark of the cross-entropy rows kernel (train/loss.py) at one GPT-base chunk: 4096 x 50304
bf16 logits, loss per row + the gradient written in place. Variants:

- `two_pass`: the shipped kernel (one program per row; pass 1 max/sum-exp, pass 2 the gradient);
- `persistent_kN`: the same two passes, N programs per SM looping over rows, so the rows in flight
  (and re-read by pass 2) fit in L2;
- `row_in_registers_wN`: single pass over memory: the whole row is loaded once into registers (one
  power-of-two block), max, sum-exp and the gradient from those registers.

Each is checked against torch (loss and gradient) before it is timed. CUDA events, median of 30; one
JSON line per variant.

    python tools/bench_ce.py
"""
import datetime
import json

import torch
import triton
import triton.language as tl

from ssd_megatron.bench.timing import time_calls
from ssd_megatron.train import loss as L


@triton.jit
def ce_persistent_kernel(logits_ptr, stride, labels_ptr, loss_ptr, C, V, ignore_index, BLOCK: tl.constexpr):
    for row in range(tl.program_id(0), C, tl.num_programs(0)):
        ptr = logits_ptr + row.to(tl.int64) * stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        m = float("-inf")
        s = 0.0
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(ptr + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            z = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
            g = tl.where(valid, g, 0.0)
            tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def ce_row_in_registers_kernel(logits_ptr, stride, labels_ptr, loss_ptr, V, ignore_index, ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    cols = tl.arange(0, ROW)
    z = tl.load(ptr + cols, mask=cols < V, other=float("-inf"))
    m = tl.max(z.to(tl.float32), axis=0)
    s = tl.sum(tl.exp(z.to(tl.float32) - m), axis=0)
    lse = m + tl.log(s)
    target = tl.sum(tl.where(cols == label, z.to(tl.float32), 0.0), axis=0)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    g = tl.exp(z.to(tl.float32) - lse) - tl.where(cols == label, 1.0, 0.0)
    g = tl.where(valid, g, 0.0)
    tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def persistent(k, warps, block):
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def run(logits, labels):
        C, V = logits.shape
        loss = torch.empty(C, dtype=torch.float32, device=logits.device)
        ce_persistent_kernel[(min(C, sms * k),)](logits, logits.stride(0), labels, loss, C, V, L.IGNORE_INDEX,
                                                 BLOCK=block, num_warps=warps)
        return loss
    return run


def row_in_registers(warps):
    def run(logits, labels):
        C, V = logits.shape
        loss = torch.empty(C, dtype=torch.float32, device=logits.device)
        ce_row_in_registers_kernel[(C,)](logits, logits.stride(0), labels, loss, V, L.IGNORE_INDEX,
                                         ROW=triton.next_power_of_2(V), num_warps=warps)
        return loss
    return run


def main():
    dev = torch.device("cuda")
    C, V = 4096, 50304
    g = torch.Generator(device=dev).manual_seed(0)
    base = (torch.randn(C, V, device=dev, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (C,), device=dev, generator=g)
    labels[::7] = L.IGNORE_INDEX
    want_grad = base.clone()
    want_loss = L._ce_rows_torch_(want_grad, labels, True)
    assert L._triton_ok(), "the shipped Triton kernel did not build"
    variants = {"two_pass": lambda x, y: L._ce_rows_triton_(x, y, True)}
    for k in (1, 2, 3):
        for w in (8, 16):
            variants[f"persistent_k{k}_w{w}"] = persistent(k, w, 16384 if w == 16 else 8192)
    for w in (8, 16, 32):
        variants[f"row_in_registers_w{w}"] = row_in_registers(w)
    bufs = [base.clone() for _ in range(3)]
    meta = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__, "shape": [C, V]}
    for name, fn in variants.items():
        x = base.clone()
        try:
            got = fn(x, labels)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            print(json.dumps({**meta, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]}))
            continue
        ok = (torch.allclose(got, want_loss, atol=1e-3, rtol=1e-4)
              and torch.allclose(x.float(), want_grad.float(), atol=2e-2, rtol=2e-2))
        t = time_calls(lambda i: fn(bufs[i % 3], labels), 30, 3, pre=lambda i: bufs[i % 3].copy_(base))
        ms = t["median"]
        print(json.dumps({**meta, "variant": name, "ms": round(ms, 4), "correct": bool(ok),
                          "tbps": round(2 * C * V * 2 / ms / 1e9, 2)}), flush=True)


if __name__ == "__main__":
    main()
