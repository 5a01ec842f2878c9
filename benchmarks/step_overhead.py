"""Per-step cost of regkern.SGD (RowL2 with row norms on conv/linear weights,
momentum, weight decay) on ResNet-56 shapes, split into the kernel calls and
the Python around them.

    python benchmarks/step_overhead.py [steps]

Prints the median of the whole ``opt.step()``, the median of the same
kernel calls made directly (``Backend.run`` over the step's tables), and the
difference: the Python part. ``REGKERN_STEP_READER=0`` measures the step
without the C++ step reader (regkern/backends/step_reader.py).
"""
import os
import statistics
import sys
import time

import torch

import regkern
from regkern.bench.shapes import resnet56

torch.set_num_threads(2)
params = [torch.nn.Parameter(torch.randn(s.shape)) for s in resnet56()]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
weights = [p for p in params if p.dim() > 1]
others = [p for p in params if p.dim() <= 1]
opt = regkern.SGD([{"params": weights, "regularizer": regkern.RowL2(track_norms=True)}, {"params": others}],
                  lr=1e-3, momentum=0.9, weight_decay=5e-4)
for _ in range(200):
    opt.step()
options = dict(lr=1e-3, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=5e-4, maximize=False,
               grad_scale=None, found_inf=None)
plans = [cached.plan for cached in opt._plans.values()]


def kernels():
    for plan in plans:
        for launch in plan.launches:
            plan.backend.run(plan.family, launch, **options)


times = {"step": [], "kernels": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3000):  # interleaved: both see the same machine
    for name, fn in (("step", opt.step), ("kernels", kernels)):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
step, kern = (statistics.median(times[k]) * 1e3 for k in ("step", "kernels"))
readers = [(cached.reader, group["params"]) for cached, group in zip(opt._plans.values(), opt.param_groups)
           if getattr(cached, "reader", None) is not None]
read = ""
if readers:  # the reader's own share: its per-step read of every group
    reads = []
    for _ in range(len(times["step"])):
        t = time.perf_counter()
        for reader, group_params in readers:
            reader.read(group_params)
        reads.append(time.perf_counter() - t)
        for reader, _ in readers:
            reader.release()
    read = (f", reader reads {statistics.median(reads) * 1e6:.1f} us "
            f"({statistics.median(reads) * 1e9 / len(params):.0f} ns per tensor)")
reader = "off" if os.environ.get("REGKERN_STEP_READER") == "0" else "on"
print(f"{regkern.__file__} (step reader {reader}): step median {step:.4f} ms, kernels alone {kern:.4f} ms, "
      f"Python part {step - kern:.4f} ms{read}, n={len(times['step'])}")
