"""Pure-torch reference kernels: the mathematics of docs/ made executable.

Every fast backend (C++ on CPU, Triton on CUDA) is tested against these
functions; they also run on any other device.
"""
from regkern.reference.adam import adam_step
from regkern.reference.admm import admm_zu_step, sas_admm_step
from regkern.reference.rda import rda_step
from regkern.reference.sgd import sgd_step

__all__ = ["sgd_step", "adam_step", "rda_step", "admm_zu_step", "sas_admm_step"]
