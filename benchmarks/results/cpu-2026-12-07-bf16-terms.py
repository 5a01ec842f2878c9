"""bf16 SGD term paths vs the plain bf16 step, interleaved, medians (the script behind cpu-2026-12-07-bf16-terms.txt)."""
import sys, time, statistics, argparse
import torch, regkern
from regkern.bench.shapes import shape_set
p = argparse.ArgumentParser()
p.add_argument("--shapes", default="resnet50")
p.add_argument("--rows", default="plain,rowl2,l1,prox,colL2,rowcol,group")
p.add_argument("--rounds", type=int, default=15)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--dtype", default="bf16")
p.add_argument("--cpu", action="store_true", help="process CPU time instead of wall time")
a = p.parse_args()
DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[a.dtype]
torch.set_num_threads(a.threads)
shapes = shape_set(a.shapes)
gen = torch.Generator().manual_seed(0)
W = [(torch.randn(s.shape, generator=gen) * 0.05).to(DT) for s in shapes]
G = [(torch.randn(s.shape, generator=gen) * 0.01).to(DT) for s in shapes]
reg = [i for i, s in enumerate(shapes) if s.regularized]
plain = [i for i, s in enumerate(shapes) if not s.regularized]
REGS = {"plain": None, "rowl2": lambda: regkern.RowL2(), "l1": lambda: regkern.L1(1e-4),
        "prox": lambda: regkern.ProxL1(1e-4), "colL2": lambda: regkern.ColumnL2(),
        "rowcol": lambda: regkern.RowL2(columns=True), "group": lambda: regkern.GroupLasso(1e-4)}
def make(name):
    params = []
    for w, g in zip(W, G):
        q = torch.nn.Parameter(w.clone()); q.grad = g.clone(); params.append(q)
    if REGS[name] is None:
        groups = [{"params": params}]
    else:
        groups = [{"params": [params[i] for i in reg], "regularizer": REGS[name]()}, {"params": [params[i] for i in plain]}]
    opt = regkern.SGD(groups, lr=0.01, momentum=0.9, weight_decay=1e-4, backend="cpp")
    opt.step()
    g2 = torch.Generator().manual_seed(1)
    for i in reg:
        st = opt.state[params[i]]
        if "lam" in st: st["lam"].copy_(torch.rand(st["lam"].shape, generator=g2) * 1e-3 + 1e-5)
        if "lam_cols" in st: st["lam_cols"].copy_(torch.rand(st["lam_cols"].shape, generator=g2) * 1e-3 + 1e-5)
    opt.step()
    return opt
rows = a.rows.split(",")
opts = {r: make(r) for r in rows}
times = {r: [] for r in rows}
for rnd in range(a.rounds):
    for r in rows:
        o = opts[r]
        for _ in range(a.steps):
            clk = time.process_time if a.cpu else time.perf_counter
            t0 = clk(); o.step(); times[r].append(clk() - t0)
base = statistics.median(times["plain"]) if "plain" in times else None
for r in rows:
    m = statistics.median(times[r])
    print(f"{a.shapes:10s} {r:8s} {m*1e3:8.3f} ms  x{m/base:5.2f}" if base else f"{r} {m*1e3:.3f}")
