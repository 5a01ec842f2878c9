"""The kernel dispatchers: ``dispatch`` (backend choice, checks, the plan
base), then one module per kernel family (``sgd``, ``adam``, ``rda``,
``admm``). Column layouts of their tables: ``regkern.layouts``; the kernels:
``regkern._C`` (C++) and ``regkern.kernels`` (Triton); the math:
``regkern.reference``."""
