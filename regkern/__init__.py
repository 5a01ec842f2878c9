"""regkern: fused kernels for regularization-based neural-network pruning."""
import torch  # noqa: F401  (loaded first: regkern._C shares torch's OpenMP runtime)

from regkern import admm
from regkern.optim import RDA, SASADMM, SGD
from regkern.regularizers import ADMM, L1, Clamp, GroupLasso, Polarization, ProxL1, RowL2

__all__ = ["SGD", "RowL2", "L1", "ProxL1", "GroupLasso", "Polarization", "Clamp", "ADMM", "SASADMM", "admm", "RDA"]
