"""regkern AdamW+RowL2 bf16 vs torch fused AdamW bf16 (no reg), interleaved medians ."""
import time, statistics, argparse
import torch, regkern
from regkern.bench.shapes import shape_set
p = argparse.ArgumentParser()
p.add_argument("--shapes", default="resnet50"); p.add_argument("--rounds", type=int, default=8)
p.add_argument("--steps", type=int, default=5); p.add_argument("--threads", type=int, default=2)
p.add_argument("--cpu", action="store_true"); p.add_argument("--rows", default="regkern,noreg,torchfused")
a = p.parse_args(); torch.set_num_threads(a.threads)
shapes = shape_set(a.shapes); gen = torch.Generator().manual_seed(0)
W = [(torch.randn(s.shape, generator=gen) * 0.05).bfloat16() for s in shapes]
G = [(torch.randn(s.shape, generator=gen) * 0.01).bfloat16() for s in shapes]
reg = [i for i, s in enumerate(shapes) if s.regularized]; plain = [i for i, s in enumerate(shapes) if not s.regularized]
def params():
    out = []
    for w, g in zip(W, G):
        q = torch.nn.Parameter(w.clone()); q.grad = g.clone(); out.append(q)
    return out
def make(name):
    ps = params()
    if name == "torchfused":
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, fused=True)
    elif name == "noreg":
        opt = regkern.AdamW(ps, lr=1e-3, weight_decay=1e-2, backend="cpp")
    else:
        opt = regkern.AdamW([{"params": [ps[i] for i in reg], "regularizer": regkern.RowL2()},
                             {"params": [ps[i] for i in plain]}], lr=1e-3, weight_decay=1e-2, backend="cpp")
    opt.step()
    if name == "regkern":
        g2 = torch.Generator().manual_seed(1)
        for i in reg:
            st = opt.state[ps[i]]; st["lam"].copy_(torch.rand(st["lam"].shape, generator=g2) * 1e-3 + 1e-5)
    opt.step()
    return opt
rows = a.rows.split(","); opts = {r: make(r) for r in rows}; times = {r: [] for r in rows}
clk = time.process_time if a.cpu else time.perf_counter
for _ in range(a.rounds):
    for r in rows:
        for _ in range(a.steps):
            t0 = clk(); opts[r].step(); times[r].append(clk() - t0)
base = statistics.median(times[rows[0]])
for r in rows:
    m = statistics.median(times[r]); print(f"{a.shapes:10s} {r:10s} {m*1e3:8.3f} ms  x{m/base:5.2f} of {rows[0]}")
