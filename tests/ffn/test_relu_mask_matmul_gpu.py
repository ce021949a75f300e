"""The masked GEMM's kernels on a GPU (skipped without CUDA): the Gluon ping-pong kernel (compute capability
9.0, row-major operands), the persistent Triton TMA kernel (Hopper and newer, TMA-describable operands) and
the pointer kernel they fall back to compute (a @ b) * (h > 0), with exact zeros where h <= 0 and every
element written, at shapes off the tile grid and at any strides; with `col_sum` also c's column sums."""
import importlib.util

import pytest
import torch

from ssd_megatron.ffn import relu_mask_gemm_gluon as g
from ssd_megatron.ffn import relu_mask_matmul as m

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check(a, b, h, expect_tma=None):
    M, N = h.shape
    torch.full((M, N), float("nan"), device="cuda", dtype=a.dtype)  # freed: the output's block holds NaN
    if expect_tma is not None and m._sms(a.device):
        views = m._tma_operands(a, b, h, torch.empty(M, N, device="cuda", dtype=a.dtype))
        assert (views is not None) == expect_tma
    c = m.launch(a, b, h)
    ref = torch.where(h > 0, a.double() @ b.double(), 0.0)
    assert c.shape == (M, N) and c.dtype == a.dtype
    assert not torch.isnan(c).any()
    assert torch.all(c[h <= 0] == 0)
    assert ((c.double() - ref).norm() / ref.norm()).item() < 1e-2
    # The same kernel with the column sums of c (the FFN's b_i gradient) from its epilogue.
    c2, partial = m.launch(a, b, h, col_sum=True)
    assert torch.equal(c2, c) and partial.dtype == torch.float32
    col = c.double().sum(0)
    assert ((partial.double().sum(0) - col).norm() / col.norm()).item() < 1e-3


def _r(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda").to(dtype)


SHAPES = [(16384, 768, 6144), (1000, 768, 6136), (77, 64, 130), (4099, 200, 1000), (1000, 768, 6100), (5, 24, 16),
          (16461, 200, 6136), (3000, 40, 2048)]


@pytest.fixture(params=["gluon", "triton"])
def kernel(request):
    """Each shape through the Gluon kernel (where it applies) and through the Triton kernels."""
    m.USE_GLUON = request.param == "gluon"
    try:
        yield request.param
    finally:
        m.USE_GLUON = True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(shape, dtype, kernel):
    M, K, N = shape
    aligned = K % 8 == 0 and N % 8 == 0
    a, b, h = _r(M, K, dtype=dtype), _r(K, N, dtype=dtype), torch.relu(_r(M, N, dtype=dtype))
    if kernel == "gluon":  # on an H100 with a Triton that has Gluon, the Gluon kernel must build and serve
        hopper = torch.cuda.get_device_capability() == (9, 0)
        gluon = importlib.util.find_spec("triton.experimental.gluon") is not None
        assert g.serves(a, b, h, torch.empty_like(h)) == (aligned and hopper and gluon)
    _check(a, b, h, expect_tma=aligned)


def test_layouts(kernel):
    _check(_r(768, 3000).t(), _r(768, 2048), torch.relu(_r(3000, 2048)))  # column-major a
    _check(_r(3000, 768), _r(2048, 768).t(), torch.relu(_r(3000, 2048)), expect_tma=True)  # W_out.t()
    _check(_r(3000, 768), _r(768, 2048), torch.relu(_r(3000, 4096))[:, 1000:3048], expect_tma=True)  # strided h
    _check(_r(1000, 771)[:, :768], _r(768, 2048), torch.relu(_r(1000, 2048)), expect_tma=False)  # unaligned a


def test_pointer_kernel_when_tma_is_off():
    m.USE_TMA = False
    try:
        _check(_r(2000, 768), _r(768, 6144), torch.relu(_r(2000, 6144)), expect_tma=False)
    finally:
        m.USE_TMA = True
