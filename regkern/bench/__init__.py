"""Benchmarks of the regkern kernels (``python -m regkern bench``).

``shapes`` holds the parameter shape sets of real networks; ``harness`` the
timing, the cases, the row and suite registries, the runner and the tables;
``sgd`` (the GReg RowL2 step), ``regularizers`` (ProxL1, GroupLasso, L1,
Polarization, ADMM, the ADMM Z/U update, SAS-ADMM), ``rda`` and ``adam``
(AdamW with RowL2) the suites, each importing only ``harness`` and
``shapes``; ``cli`` the command line, which imports every suite.
"""
