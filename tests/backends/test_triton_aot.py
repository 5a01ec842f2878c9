"""regkern's Triton kernels compiled ahead of time for sm_80, sm_90 and gfx942, without a GPU.

The specializations are recorded (``aot.record_launches``) from real steps on
CPU tensors in Triton's interpreter: ``regkern.SGD`` (plain, momentum,
nesterov, maximize, weight decay, GradScaler, every regularizer, masks, row
norms), ``regkern.Adam`` / ``regkern.AdamW`` (both couplings, amsgrad,
GradScaler), ``regkern.RDA`` (element and group), ``regkern.SASADMM`` and
``regkern.admm.update`` (element and row top-k, soft threshold: the score and
Z/U kernels), and the kernel entry points with what a launch without host
synchronisation hands them (a device learning rate, GradScaler's
``found_inf``). The regularizer terms are runtime branches on the metadata
table, so they share their family's few specializations. fp32 and bf16
steps are recorded for every family, fp16 for a few (its code differs from
bf16's only in the conversions).

Every specialization is compiled for sm_90; the hot ones (``*`` in the
table: SGD and Adam/AdamW training steps in fp32 and bf16, with and without
momentum and GradScaler, RowL2 and proximal terms, masks and norms, and RDA)
also for sm_80 and gfx942: 19 hot and 21 other specializations, 80
compiles with the score kernel's, which take about 3 CPU-minutes with a cold Triton cache (two
compile processes; 40 s with a warm one, most of it recording the steps in
the interpreter). A compile error fails; the hot
specializations must not spill on sm_80 and sm_90, and must move W, the
gradient and the optimizer state in vector accesses. The table of
registers, spills and vector accesses is printed (``pytest -s``);
``python tests/backends/test_triton_aot.py [FILE]`` writes it for all three
targets and every specialization to FILE.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

import aot  # noqa: E402  (tests/backends/aot.py: the compile harness)

SHAPES = [(8, 4, 3, 3), (8,), (10, 36)]  # conv weight, bias, linear weight: rows of 36 and 1
HERE = Path(__file__).resolve()


def _parameters(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


def _with_grads(params):
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    return params


def _steps(make_optimizer, dtype, steps=1, scaler=False, after=None):
    """``steps`` steps of ``make_optimizer(params)`` on fresh parameters
    (through a CPU GradScaler when ``scaler``); ``after(optimizer)`` runs after each."""
    def run():
        params = _parameters(dtype)
        opt = make_optimizer(params)
        grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
        for _ in range(steps):
            if grad_scaler is None:
                _with_grads(params)
                opt.step()
            else:
                opt.zero_grad()
                loss = sum((p.float() * torch.randn(p.shape)).sum() for p in params)
                grad_scaler.scale(loss).backward()
                grad_scaler.step(opt)
                grad_scaler.update()
            if after is not None:
                after(opt)
    return run


def _masked(regularizer):
    """A RowL2-style group with row masks on the weights (mask kind 1)."""
    def make(params):
        import regkern
        opt = regkern.SGD([{"params": params, "regularizer": regularizer}], lr=0.1, momentum=0.9,
                          weight_decay=1e-4, backend="triton")
        for p in params:
            opt.state[p]["mask"] = torch.arange(p.shape[0]) % 3 != 0
        return opt
    return make


def _kernel_entry_steps(dtype):
    """The kernel entry points with a 0-d learning-rate tensor and GradScaler's
    ``found_inf`` on the kernels' device (what a launch without host
    synchronisation hands them): SGD with momentum, AdamW."""
    def run():
        from regkern.backends.adam import build_adam_table
        from regkern.backends.sgd import build_sgd_table
        from regkern.kernels import adam as triton_adam
        from regkern.kernels import sgd as triton_sgd
        amp = dict(grad_scale=torch.tensor(256.0), found_inf=torch.tensor(0.0), lr=torch.tensor(0.01))
        # the tables hold raw addresses: every tensor they point at stays referenced here
        ws = [p.detach() for p in _parameters(dtype)]
        gs = [torch.randn(w.shape).to(dtype) for w in ws]
        bufs = [torch.zeros_like(w) for w in ws]
        table = build_sgd_table(ws, gs, bufs, [None] * 3, [None] * 3, [None] * 3, [True] * 3)
        triton_sgd.sgd_step(table, dtype, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-4,
                            maximize=False, **amp)
        moments = [[torch.zeros_like(w) for w in ws] for _ in range(2)]
        steps = [torch.zeros(()) for _ in ws]
        table = build_adam_table(ws, gs, *moments, [None] * 3, steps, [None] * 3, [None] * 3, [None] * 3)
        triton_adam.adam_step(table, dtype, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay=0.01,
                              amsgrad=False, maximize=False, coupled=False, **amp)
    return run


def _admm_updates(dtype):
    """regkern.admm.update (element and row top-k, soft threshold) after SGD steps with regkern.ADMM."""
    def run():
        import regkern
        params = _parameters(dtype)
        opt = regkern.SGD([{"params": params, "regularizer": regkern.ADMM(1e-3)}], lr=0.1, backend="triton")
        _with_grads(params)
        opt.step()
        for options in (dict(ratio=0.5), dict(ratio=0.5, rows=True), dict(prox="l1", lam=1e-3)):
            regkern.admm.update(opt, **options, backend="triton")
    return run


def workloads():
    """``(label, hot, step)`` for every kind of step regkern launches kernels for."""
    import regkern

    def sgd(**options):
        regularizer = options.pop("regularizer", None)
        return lambda ps: regkern.SGD([{"params": ps, "regularizer": regularizer}], lr=0.1, backend="triton",
                                      **options)

    def adam(cls, **options):
        regularizer = options.pop("regularizer", regkern.RowL2())
        return lambda ps: cls([{"params": ps, "regularizer": regularizer}], lr=1e-3, backend="triton", **options)

    out = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out += [
            (f"sgd {name}", True, _steps(sgd(), dtype)),
            (f"sgd {name} momentum wd RowL2(norms)", True,
             _steps(sgd(momentum=0.9, weight_decay=5e-4, regularizer=regkern.RowL2(track_norms=True)), dtype)),
            (f"sgd {name} momentum GradScaler", True, _steps(sgd(momentum=0.9), dtype, scaler=True)),
            (f"sgd {name} GradScaler", True, _steps(sgd(), dtype, scaler=True)),
            (f"sgd {name} momentum masks", True, _steps(_masked(regkern.RowL2()), dtype)),
            (f"adamw {name} decoupled RowL2", True, _steps(adam(regkern.AdamW), dtype)),
            (f"adamw {name} coupled RowL2 GradScaler", True,
             _steps(adam(regkern.AdamW, coupling="coupled"), dtype, scaler=True)),
            (f"adam {name} coupled ProxL1", True,
             _steps(adam(regkern.Adam, weight_decay=1e-4, coupling="coupled", regularizer=regkern.ProxL1(1e-4)),
                    dtype)),
            (f"rda {name} element", True,
             _steps(lambda ps: regkern.RDA(ps, lr=0.1, lam=1e-3, backend="triton"), dtype)),
            (f"rda {name} group GradScaler", True,
             _steps(lambda ps: regkern.RDA(ps, lr=0.1, lam=1e-3, group=True, backend="triton"), dtype, scaler=True)),
            (f"adam {name} amsgrad maximize", False, _steps(adam(regkern.Adam, amsgrad=True, maximize=True), dtype)),
            (f"kernel entry {name} device lr found_inf", False, _kernel_entry_steps(dtype)),
        ]
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        out += [
            (f"sas-admm {name}", False, _steps(lambda ps: regkern.SASADMM(ps, backend="triton"), dtype)),
            (f"admm {name} update", False, _admm_updates(dtype)),
        ]
    half = torch.float16
    out += [
        ("sgd fp16 momentum GradScaler", False, _steps(sgd(momentum=0.9), half, scaler=True)),
        ("adamw fp16 decoupled RowL2", False, _steps(adam(regkern.AdamW), half)),
        ("rda fp16 group", False, _steps(lambda ps: regkern.RDA(ps, lr=0.1, lam=1e-3, group=True, backend="triton"),
                                        half)),
        ("sgd fp32 nesterov maximize", False, _steps(sgd(momentum=0.9, nesterov=True, maximize=True), torch.float32)),
    ]
    for regularizer in (regkern.ElementL2(), regkern.ColumnL2(), regkern.L1(1e-4), regkern.ProxL1(1e-4),
                        regkern.GroupLasso(1e-4), [regkern.Polarization(), regkern.Clamp(0.0, 1.0)],
                        regkern.ADMM(1e-3)):
        label = "+".join(type(r).__name__ for r in (regularizer if isinstance(regularizer, list) else [regularizer]))
        out.append((f"sgd fp32 momentum {label}", True,
                    _steps(sgd(momentum=0.9, regularizer=regularizer), torch.float32)))
    return out


def targets_of(spec):
    """Every specialization for sm_90, the hot ones for every target."""
    return tuple(aot.TARGETS) if spec.hot else ("sm_90",)


def _record():
    """The specializations, recorded here under the interpreter or, on a GPU
    machine (no interpreter), in a subprocess that has it."""
    if triton.knobs.runtime.interpret:
        return aot.collect(workloads())
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(aot.ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    run = subprocess.run([sys.executable, str(HERE), "--record"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return aot.specializations_from_json(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    specs = _record()
    results = aot.compile_specializations(specs, targets_of)
    print("\n" + aot.format_table(specs, results))
    return specs, results


def _spec(specs, kernel):
    return [s for s in specs if s.kernel.endswith(":" + kernel)]


def test_every_launched_kernel_compiles(compiled):
    specs, results = compiled
    errors = [f"{t} {s.label}: {results[(t, s.key)]['error']}" for s in specs for t in targets_of(s)
              if "error" in results[(t, s.key)]]
    assert not errors, "\n\n".join(errors)


def test_recording_covers_every_kernel_and_option(compiled):
    # what the compile tests stand on: each kernel regkern has, in each dtype,
    # with the options that change its code
    specs, _ = compiled
    kernels = {s.kernel.split(":")[1] for s in specs}
    assert kernels == {"_sgd_kernel", "_adam_kernel", "_count_steps", "_rda_kernel", "_sas_kernel",
                       "_scores_kernel", "_zu_kernel"}
    for kernel in ("_sgd_kernel", "_adam_kernel", "_rda_kernel", "_sas_kernel", "_scores_kernel", "_zu_kernel"):
        assert {s.kwargs["DTYPE"]["tl"] for s in _spec(specs, kernel)} == {"fp32", "bf16", "fp16"}, kernel
    sgd = _spec(specs, "_sgd_kernel")
    for flag in ("MOMENTUM", "NESTEROV", "MAXIMIZE", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "LR_ON_DEVICE"):
        assert {s.kwargs[flag] for s in sgd} == {False, True}, flag
    adam = _spec(specs, "_adam_kernel")
    for flag in ("AMSGRAD", "MAXIMIZE", "COUPLED", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "LR_ON_DEVICE"):
        assert {s.kwargs[flag] for s in adam} == {False, True}, flag
    assert {s.kwargs["HAS_GRAD_SCALE"] for s in _spec(specs, "_rda_kernel")} == {False, True}


def test_admm_scores_kernel_compiles_for_every_target(compiled):
    # its element and row branches once typed one pointer fp32 and float64
    specs, results = compiled
    scores = _spec(specs, "_scores_kernel")
    for t in aot.TARGETS:
        result = aot.compile_specializations(scores[:1], lambda s: (t,))[(t, scores[0].key)]
        assert "error" not in result, f"{t}: {result.get('error')}"


def test_hot_kernels_do_not_spill_on_nvidia(compiled):
    specs, results = compiled
    hot = [s for s in specs if s.hot]
    # SGD and Adam/AdamW in fp32 / bf16 with and without momentum / GradScaler, RDA
    assert {s.kernel.split(":")[1] for s in hot} >= {"_sgd_kernel", "_adam_kernel", "_rda_kernel"}
    spilled = [f"{t} {s.label}: {results[(t, s.key)]}" for s in hot for t in aot.NVIDIA
               if "error" not in results[(t, s.key)] and aot.spills(results[(t, s.key)])]
    assert not spilled, "spills in hot specializations:\n" + "\n".join(spilled)


def test_hot_kernels_move_memory_in_vector_accesses(compiled):
    # Each thread's 4 contiguous elements of W, the gradient and the state in
    # one access: 16 bytes (v4) for fp32, 8 bytes (v2) for 16-bit storage
    # (rda's 8 elements per thread: 16 bytes too).
    specs, results = compiled
    scalar = []
    for s in specs:
        if not s.hot or "_count_steps" in s.kernel:
            continue
        width = "v4" if s.kwargs["DTYPE"]["tl"] == "fp32" or "_rda_kernel" in s.kernel else "v2"
        for t in aot.NVIDIA:
            r = results[(t, s.key)]
            if "error" not in r and not (r[f"{width}_loads"] and r[f"{width}_stores"]):
                scalar.append(f"{t} {s.label}: no {width} loads and stores: {r}")
    assert not scalar, "\n".join(scalar)


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        print(aot.specializations_to_json(aot.collect(workloads())))
    else:
        specs = _record()
        results = aot.compile_specializations(specs, lambda s: tuple(aot.TARGETS))
        table = aot.format_table(specs, results)
        if len(sys.argv) > 1:
            Path(sys.argv[1]).write_text(table + "\n")
        print(table)
