"""cuBLASLt GEMMs with ReLU epilogues that torch does not expose: the dense ReLU FFN at cuBLAS speed.

- forward, RELU_AUX_BIAS: h = relu(x W_iᵀ + b_i), and a bit-mask of h > 0 (1 bit per element,
  [tokens, d_ff / 8] bytes: 12.6 MB at GPT-base shape instead of re-reading the 201 MB h).
- backward, DRELU_BGRAD: g = (dy W_o) ⊙ mask and, in the same kernel, b_i's gradient Σ_tokens g.

Megatron-LM / Transformer Engine and apex's fused_dense use the same epilogues (GELU_AUX / DGELU there).
Before this, the backward ran a Triton GEMM with h loaded in its epilogue (relu_mask_matmul.py: 0.36 ms vs
cuBLAS's 0.22 ms for the plain product at 16384 x 768 x 6144 on an H100) and b_i's gradient rode on the
W_i-gradient GEMM as an extra column of ones (a copy of x per layer).

cuBLASLt is reached through ctypes: torch already loaded the library (its own GEMMs use it), so nothing
is built or installed. The plan for a shape (descriptors, layouts, the heuristic's first algorithm) is
made once and cached; each call sets the pointers and launches on torch's current stream, with a
workspace tensor of our own, so the calls are CUDA-graph capturable. Everything is column-major in
cuBLAS terms: a row-major [T, F] output is a column-major F x T matrix, so h^T = op(W_i) x^T etc.

`usable(x, w_in)` says whether these kernels serve a problem (CUDA, fp16/bf16, d_ff a multiple of 128 for
the mask's leading dimension, the library found, `USE_CUBLASLT`); elsewhere the caller keeps its other
path. A failed plan (no algorithm for a shape) disables the path for that shape, not the process.
"""
from __future__ import annotations

import ctypes
import glob
import os
import threading

import torch

# Switch for benchmarks and tests (bench/step.py --variant no-cublaslt-relu); SSD_MEGATRON_CUBLASLT=0
# in the environment turns the path off for a run.
USE_CUBLASLT = os.environ.get("SSD_MEGATRON_CUBLASLT", "1") != "0"

_OP_N, _OP_T = 0, 1
_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF = 0, 2, 14
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE = 1
_EPI_RELU_AUX_BIAS, _EPI_DRELU, _EPI_DRELU_BGRAD = 134, 136, 152
_WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLASLt on Hopper


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_STATE: dict = {"lib": None, "ok": None, "handle": None, "plans": {}, "workspace": {}}
_LOCK = threading.RLock()


def _find_library() -> str | None:
    torch.cuda.current_blas_handle()  # makes torch load cuBLAS (and with it cuBLASLt)
    with open("/proc/self/maps") as f:
        for line in f:
            if "libcublasLt.so" in line:
                return line.split()[-1]
    import site

    roots = [os.path.dirname(torch.__file__)] + site.getsitepackages()
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "**", "libcublasLt.so*"), recursive=True))
        if hits:
            return hits[0]
    return None


def _lib():
    if _STATE["ok"] is None:
        with _LOCK:
            if _STATE["ok"] is None:
                try:
                    path = _find_library()
                    lib = ctypes.CDLL(path) if path else None
                    handle = ctypes.c_void_p()
                    ok = lib is not None and lib.cublasLtCreate(ctypes.byref(handle)) == 0
                    _STATE.update(lib=lib, handle=handle, ok=ok)
                except (OSError, AttributeError, RuntimeError):
                    _STATE["ok"] = False
    return _STATE["lib"] if _STATE["ok"] else None


def _dtype_code(dtype: torch.dtype) -> int:
    return {torch.bfloat16: _R_16BF, torch.float16: _R_16F}[dtype]


def usable(x: torch.Tensor, w_in: torch.Tensor) -> bool:
    """Whether the epilogue kernels serve x [T, D] @ w_in [F, D]^T (decided the same way at trace time)."""
    if not (USE_CUBLASLT and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w_in.dtype == x.dtype):
        return False
    F, D = w_in.shape
    if F % 128 or D % 8:
        return False
    return _lib() is not None and _STATE["plans"].get(("fwd", F, D, x.dtype)) is not False


def _set(lib, desc, attr: int, value) -> None:
    _check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(value), ctypes.sizeof(value)), "set attribute")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed (status {status})")


def _layout(lib, dtype_code: int, rows: int, cols: int, ld: int):
    lay = ctypes.c_void_p()
    _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype_code, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                                          ctypes.c_int64(ld)), "layout")
    return lay


def _plan(kind: str, m: int, n: int, k: int, dtype: torch.dtype):
    """D[m, n] (column-major) = op(A) op(B) with the epilogue of `kind`; cached per shape."""
    key = (kind, m, n, k, dtype)
    plan = _STATE["plans"].get(key)
    if plan is not None:
        return plan
    lib = _lib()
    code = _dtype_code(dtype)
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "desc")
    if kind == "fwd":  # h^T [F, T] = W_i (row-major [F, D] = column-major D x F, transposed) x^T (D x T)
        trans_a, epi = _OP_T, _EPI_RELU_AUX_BIAS
        a = _layout(lib, code, k, m, k)
    else:  # g^T [F, T] = W_o (row-major [D, F] = column-major F x D) dy^T (D x T)
        trans_a, epi = _OP_N, (_EPI_DRELU_BGRAD if kind == "bwd_bgrad" else _EPI_DRELU)
        a = _layout(lib, code, m, k, m)
    b = _layout(lib, code, k, n, k)
    d = _layout(lib, code, m, n, m)
    _set(lib, desc, _DESC_TRANSA, ctypes.c_int32(trans_a))
    _set(lib, desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
    _set(lib, desc, _DESC_EPILOGUE, ctypes.c_uint32(epi))
    _set(lib, desc, _DESC_AUX_LD, ctypes.c_int64(m))
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
    ws = ctypes.c_size_t(_WORKSPACE_BYTES)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE, ctypes.byref(ws), ctypes.sizeof(ws)),
           "preference attribute")
    heur = _Heuristic()
    count = ctypes.c_int(0)
    status = lib.cublasLtMatmulAlgoGetHeuristic(_STATE["handle"], desc, a, b, d, d, pref, 1, ctypes.byref(heur),
                                                ctypes.byref(count))
    lib.cublasLtMatmulPreferenceDestroy(pref)
    if status != 0 or count.value < 1:
        _STATE["plans"][key] = False
        if kind == "fwd":
            _STATE["plans"][("fwd", m, k, dtype)] = False  # usable() then says no for this FFN shape
        raise RuntimeError(f"cuBLASLt has no {kind} ReLU-epilogue algorithm for {m}x{n}x{k} {dtype} (status {status}); "
                           "run with SSD_MEGATRON_CUBLASLT=0 to use the Triton path")
    plan = (desc, a, b, d, heur.algo)
    _STATE["plans"][key] = plan
    return plan


def _workspace(device: torch.device) -> torch.Tensor:
    ws = _STATE["workspace"].get(device)
    if ws is None:
        ws = _STATE["workspace"][device] = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def _run(kind: str, m: int, n: int, k: int, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
         bias: torch.Tensor | None, aux: torch.Tensor) -> None:
    lib = _lib()
    desc, la, lb, ld, algo = _plan(kind, m, n, k, out.dtype)
    if bias is not None:
        _set(lib, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    _set(lib, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    ws = _workspace(out.device)
    stream = ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream)
    _check(lib.cublasLtMatmul(_STATE["handle"], desc, ctypes.byref(one), ctypes.c_void_p(a.data_ptr()), la,
                              ctypes.c_void_p(b.data_ptr()), lb, ctypes.byref(zero), ctypes.c_void_p(out.data_ptr()), ld,
                              ctypes.c_void_p(out.data_ptr()), ld, ctypes.byref(algo), ctypes.c_void_p(ws.data_ptr()),
                              ctypes.c_size_t(_WORKSPACE_BYTES), stream), "matmul")


def relu_aux_bias(x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = relu(x w_inᵀ + b_in) [T, F], mask [T, F/8] uint8: bit j of byte (t, i) is h[t, 8i + j] > 0)."""
    x, w_in, b_in = x.contiguous(), w_in.contiguous(), b_in.contiguous()
    T, D = x.shape
    F = w_in.shape[0]
    h = torch.empty(T, F, dtype=x.dtype, device=x.device)
    mask = torch.empty(T, F // 8, dtype=torch.uint8, device=x.device)
    with _LOCK:  # the cached descriptor holds this call's pointers until the launch
        _run("fwd", F, T, D, w_in, x, h, b_in, mask)
    return h, mask


@torch.library.custom_op("ssd_megatron::drelu_bgrad", mutates_args=())
def _drelu_bgrad(dy: torch.Tensor, w_out: torch.Tensor, mask: torch.Tensor,
                 bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dy, w_out = dy.contiguous(), w_out.contiguous()
    T, D = dy.shape
    F = w_out.shape[1]
    g = torch.empty(T, F, dtype=dy.dtype, device=dy.device)
    gb = torch.empty(F if bias_grad else 0, dtype=dy.dtype, device=dy.device)
    with _LOCK:
        _run("bwd_bgrad" if bias_grad else "bwd", F, T, D, w_out, dy, g, gb if bias_grad else None, mask)
    return g, gb


@_drelu_bgrad.register_fake
def _(dy, w_out, mask, bias_grad):
    F = w_out.shape[1]
    return dy.new_empty(dy.shape[0], F), dy.new_empty(F if bias_grad else 0)


def drelu_bgrad(dy: torch.Tensor, w_out: torch.Tensor, mask: torch.Tensor,
                bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g = (dy w_out) ⊙ mask [T, F], Σ_t g [F] in g's dtype when `bias_grad`) for dy [T, D], w_out [D, F].
    A custom op, so that the compiled backward calls it instead of tracing into ctypes."""
    g, gb = _drelu_bgrad(dy, w_out, mask, bias_grad)
    return g, (gb if bias_grad else None)
