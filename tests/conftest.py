"""Every test starts from torch's numeric defaults: a training run sets TF32 for fp32 matmuls
(train/loop.py, process-wide), which would otherwise loosen the fp32 reference checks of whichever test
the same worker runs next (seen on an H200: grouped_mm's fp32 errors above 1e-4 after a loop test)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_numeric_defaults():
    precision = torch.get_float32_matmul_precision()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
