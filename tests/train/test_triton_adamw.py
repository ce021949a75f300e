"""TritonAdamW (train/triton_adamw.py) takes torch's AdamW steps: with clip scaling (grad_scale), a skipped
non-finite step (found_inf), two groups with and without weight decay, a device learning rate, tensors of
every size relative to the block, and a state dict torch's AdamW loads. On CPU the kernel runs under
TRITON_INTERPRET=1 (a subprocess); on CUDA it is compiled and compared with torch's fused AdamW."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from ssd_megatron.train.triton_adamw import BLOCK, TritonAdamW

    device = sys.argv[1]
    torch.manual_seed(0)
    shapes = [(BLOCK + 3,), (33, 7), (1,), (2 * BLOCK,)]
    ours = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    opt = TritonAdamW(groups(ours), **kw)
    ref_kw = dict(fused=True) if device == "cuda" else dict(foreach=False)
    ref_opt = torch.optim.AdamW(groups(ref), **kw, **ref_kw)
    errs = []
    for step, (scale, bad) in enumerate([(1.0, 0.0), (2.5, 0.0), (3.0, 1.0), (1.0, 0.0)]):
        for g in opt.param_groups:  # a schedule writing a device lr in place
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(1e-2 / (step + 1))
            else:
                g["lr"] = 1e-2 / (step + 1)
        for g in ref_opt.param_groups:
            g["lr"] = 1e-2 / (step + 1)
        grads = [torch.randn_like(p) for p in ours]
        grads[1] = torch.randn(7, 33, device=device).t()  # a gradient in another layout than its parameter
        for p, r, g in zip(ours, ref, grads):  # torch's fused kernel wants the parameter's layout
            p.grad, r.grad = g.clone(), g.contiguous()
        before = [p.detach().clone() for p in ours]
        opt.grad_scale = torch.tensor(scale, device=device)
        opt.found_inf = torch.tensor(bad, device=device)
        opt.step()
        if bad:  # torch's reference: a skipped step changes nothing
            errs.append(max(float((p - b).abs().max()) for p, b in zip(ours, before)))
            continue
        if device == "cuda":
            ref_opt.grad_scale, ref_opt.found_inf = opt.grad_scale, opt.found_inf
        else:
            for r in ref:
                r.grad /= scale
        ref_opt.step()
        errs.append(max(float((p - r).abs().max()) for p, r in zip(ours, ref)))
    steps = [float(opt.state[p]["step"]) for p in ours]
    sd = opt.state_dict()
    again = torch.optim.AdamW(groups([p.detach().clone().requires_grad_() for p in ours]), **kw)
    again.load_state_dict(sd)
    moments = max(float((again.state_dict()["state"][i]["exp_avg"] - ref_opt.state[r]["exp_avg"]).abs().max())
                  for i, r in enumerate(ref))
    print(json.dumps({"errs": errs, "steps": steps, "moments": moments}))
""")


def _run(device: str, env_extra: dict) -> dict:
    env = {**os.environ, **env_extra, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", SCRIPT, device], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(res: dict, tol: float) -> None:
    errs = res["errs"]
    assert errs[2] == 0.0  # the non-finite step left every parameter as it was
    assert max(errs[:2] + errs[3:]) < tol, errs
    assert res["steps"] == [3.0] * 4  # the skipped step did not count
    assert res["moments"] < tol


def test_interpreted_kernel_takes_torch_adamw_steps():
    _check(_run("cpu", {"TRITON_INTERPRET": "1"}), tol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run via tools/gpu_bench.sh)")
def test_cuda_kernel_takes_fused_adamw_steps():
    _check(_run("cuda", {}), tol=1e-6)
