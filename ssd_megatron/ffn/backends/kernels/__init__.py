"""Triton kernels of the `triton` expert backend, one family per module; `.._triton_kernels` holds their
tile configurations and launchers."""
