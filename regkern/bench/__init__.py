"""Benchmarks of the regkern kernels (``python -m regkern bench``).

``shapes`` holds the parameter shape sets of real networks, ``sgd`` the
step-time measurements of the fused GReg step against PyTorch.
"""
