"""The GPU check of regkern's Triton path, one script for a machine with a CUDA GPU.

    python benchmarks/gpu_check.py [--quick]      # raw output: benchmarks/results/<gpu>-<date>-gpu-check.txt

Sections, each printed with its outcome (a failure is printed and the next
section runs):

1. ``kernels``: the Triton kernel tests on the GPU (``pytest tests/backends -k triton``;
   the tests run on CUDA tensors when a GPU is present).
2. ``no-sync``: steady-state steps of regkern.SGD (momentum, RowL2, masks, row
   norms) and regkern.AdamW (both couplings) with GradScaler and a learning
   rate tensor on the device, under ``torch.cuda.set_sync_debug_mode("error")``:
   any host synchronisation raises.
3. ``graph``: one step captured in a CUDA graph and replayed against the same
   steps taken eagerly from the same start; parameters and state must be equal.
4. ``bench``: ``python -m regkern bench`` on the GPU: the RowL2 table on every
   shape set, every other regularizer on ResNet-50 and ViT-B/16 shapes, and the
   Adam/AdamW table; ratios against the loops users write, torch's foreach and
   fused optimizers, torch.compile and the memory floors (the device's copy
   bandwidth measured in the same run). Aimed at under 8 minutes on one
   H100/H200 with ``--quick``.

``--quick`` shortens the benchmark. With ``--device cpu`` and
``TRITON_INTERPRET=1`` sections 2 and 3 run their step logic on small CPU
tensors through the Triton backend, without the CUDA-only parts, to check
the script itself.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

import regkern


def _section(name: str, fn) -> bool:
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    try:
        fn()
        ok = True
    except Exception:  # noqa: BLE001  (a failed section is reported, the next one runs)
        traceback.print_exc(file=sys.stdout)
        ok = False
    print(f"--- {name}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.1f} s)", flush=True)
    return ok


def _optimizers(device: str):
    """(name, params, optimizer) for each steady-state case; parameters carry lam, masks and row norms."""
    cases = []
    for name in ("sgd", "adamw-decoupled", "adam-coupled"):
        torch.manual_seed(0)
        shapes = ((64, 32, 3, 3), (256, 64), (64,), (1000, 1000)) if device == "cuda" else ((8, 4, 3, 3), (16, 8), (8,))
        params = [torch.nn.Parameter(torch.randn(shape, device=device)) for shape in shapes]
        lr = torch.tensor(0.01, device=device)
        if name == "sgd":
            opt = regkern.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4, regularizer=regkern.RowL2(),
                              backend="triton")
        else:
            opt = regkern.AdamW(params, lr=lr, weight_decay=1e-2, regularizer=regkern.RowL2(),
                                coupling=name.split("-")[1], backend="triton")
        for p in params:
            if p.dim() > 1:
                opt.state[p]["lam"].fill_(1e-3)
                opt.state[p]["mask"] = torch.ones(p.shape[0], dtype=torch.bool, device=device)
                opt.state[p]["row_norms"] = torch.zeros(p.shape[0], 3, device=device)
        cases.append((name, params, opt))
    return cases


def _fill_grads(params, seed: int) -> None:
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(torch.randn(p.shape, generator=gen, device=p.device))


def check_no_sync(device: str) -> None:
    for name, params, opt in _optimizers(device):
        opt.grad_scale = torch.tensor(1.0, device=device)
        opt.found_inf = torch.tensor(0.0, device=device)
        for t in range(3):  # plans and state are created here
            _fill_grads(params, t)
            opt.step()
        mode = torch.cuda.set_sync_debug_mode if device == "cuda" else (lambda _: None)
        mode("error")
        try:
            for t in range(3, 8):
                _fill_grads(params, t)
                opt.step()
        finally:
            mode("default")
        opt.found_inf.fill_(1.0)  # an overflow step: skipped by the kernels
        before = [p.detach().clone() for p in params]
        _fill_grads(params, 99)
        mode("error")
        try:
            opt.step()
        finally:
            mode("default")
        same = all(torch.equal(p, b) for p, b in zip(params, before))
        print(f"{name}: 5 steps and one overflow step without host synchronisation; overflow step left "
              f"the parameters {'unchanged' if same else 'CHANGED'}")
        if not same:
            raise AssertionError(f"{name}: the overflow step changed the parameters")


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], [
        {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]


@torch.no_grad()
def _restore(params, opt, snapshot) -> None:
    """Back to ``snapshot`` in place (a captured graph holds these addresses),
    writing only what changed: a write to a coefficient such as ``lam`` would
    make the next step check it, which reads the device."""
    for p, w in zip(params, snapshot[0]):
        p.copy_(w)
    for p, state in zip(params, snapshot[1]):
        for k, v in state.items():
            if not torch.equal(opt.state[p][k], v):
                opt.state[p][k].copy_(v)


def check_graph(device: str) -> None:
    replays = 5
    for name, params, opt in _optimizers(device):
        _fill_grads(params, 0)  # the same gradient tensors for every step, as a captured backward leaves them
        for _ in range(3):
            opt.step()
        start = _snapshot(params, opt)
        for _ in range(replays):
            opt.step()
        eager = _snapshot(params, opt)
        _restore(params, opt, start)
        if device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as capture asks
                opt.step()
            torch.cuda.current_stream().wait_stream(stream)
            _restore(params, opt, start)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
            _restore(params, opt, start)
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
        else:  # the script's own check: the steps from the restored start
            for _ in range(replays):
                opt.step()
        replayed = _snapshot(params, opt)
        same = all(torch.equal(a, b) for a, b in zip(replayed[0], eager[0])) and all(
            torch.equal(a[k], b[k]) for a, b in zip(replayed[1], eager[1]) for k in a)
        what = "replays of a captured step" if device == "cuda" else "eager steps from the restored start"
        print(f"{name}: {replays} {what} {'equal' if same else 'DIFFER FROM'} {replays} eager steps")
        if not same:
            raise AssertionError(f"{name}: {what} differ from the eager steps")


def run_kernel_tests() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/backends", "-k", "triton",
                             "-p", "no:cacheprovider"], text=True, capture_output=True)
    print(result.stdout[-6000:], result.stderr[-2000:])
    if result.returncode:
        raise AssertionError(f"kernel tests failed (exit {result.returncode})")


def run_bench(device: str, quick: bool) -> None:
    seconds = ["--seconds", "0.2", "--rounds", "3"] if quick else ["--seconds", "0.5", "--rounds", "5"]
    for regularizers, shapes in (("rowl2", "resnet56,resnet50,vit-b,tensor16m,tensor64m"),
                                 ("prox-l1,group-lasso,l1,polarization,admm,rda,admm-zu,sas-admm", "resnet50,vit-b"),
                                 ("adam", "resnet50,vit-b,tensor16m")):
        cmd = [sys.executable, "-m", "regkern", "bench", "--device", device, "--regularizers", regularizers,
               "--shapes", shapes, *seconds]
        print("$", " ".join(cmd[1:]), flush=True)
        result = subprocess.run(cmd, text=True, capture_output=True)
        print(result.stdout, result.stderr[-2000:])
        if result.returncode:
            raise AssertionError(f"bench exited with {result.returncode}")


class _Tee:
    """Writes to the terminal and to the raw output file alike."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="shorter benchmark rounds")
    parser.add_argument("--sections", default="kernels,no-sync,graph,bench")
    parser.add_argument("--out", default=None,
                        help="raw output file (default: benchmarks/results/<device>-<date>-gpu-check.txt)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (and TRITON_INTERPRET=1) to check the script")
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{slug}-{datetime.date.today():%Y-%m-%d}-gpu-check.txt")
    sys.stdout = _Tee(sys.stdout, open(out, "w"))
    print(f"raw output: {out}")
    print(f"regkern GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: {' '.join(sys.argv)}")
    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or 'cpu'}; "
          f"torch {torch.__version__}; python {platform.python_version()}")
    with contextlib.suppress(ImportError):
        import triton
        print(f"triton {triton.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    sections = {"kernels": run_kernel_tests, "no-sync": lambda: check_no_sync(args.device),
                "graph": lambda: check_graph(args.device), "bench": lambda: run_bench(args.device, args.quick)}
    results = {name: _section(name, sections[name]) for name in args.sections.split(",")}
    print("\nsummary:", ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
