"""Triton GPU kernels of regkern (installed as ``regkern.kernels``)."""
from .sgd import build_units, sgd_step

__all__ = ["build_units", "sgd_step"]
