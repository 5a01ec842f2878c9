"""Drop-in optimizers whose step runs the fused regkern kernels."""
from regkern.optim.adam import Adam, AdamW
from regkern.optim.rda import RDA
from regkern.optim.sas_admm import SASADMM
from regkern.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "SASADMM", "RDA"]
