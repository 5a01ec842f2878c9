"""Drop-in optimizers whose step runs the fused regkern kernels."""
from regkern.optim.sgd import SGD

__all__ = ["SGD"]
