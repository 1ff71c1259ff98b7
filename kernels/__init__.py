"""Triton kernels for the training hot path (installed as mingpt.kernels)."""
raise ImportError("no Triton kernels are written yet")
