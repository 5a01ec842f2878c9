"""Median time of one regkern.SGD step (RowL2 on conv/linear weights, momentum) on ResNet-56 shapes."""
import statistics, sys, time
import torch, regkern
from regkern.bench.shapes import resnet56
torch.set_num_threads(2)
shapes = resnet56()
params = [torch.nn.Parameter(torch.randn(s.shape)) for s in shapes]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
weights = [p for p in params if p.dim() > 1]
others = [p for p in params if p.dim() <= 1]
opt = regkern.SGD([{"params": weights, "regularizer": regkern.RowL2(track_norms=True)}, {"params": others}],
                  lr=1e-3, momentum=0.9, weight_decay=5e-4)
for _ in range(200):
    opt.step()
times = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3000):
    t = time.perf_counter(); opt.step(); times.append(time.perf_counter() - t)
print(f"{regkern.__file__}: median {statistics.median(times)*1e3:.4f} ms  min {min(times)*1e3:.4f} ms  n={len(times)}")
