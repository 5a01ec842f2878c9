"""Ahead-of-time compile of the Triton `adam` kernel for real GPUs, without a GPU.

The specializations compiled are the ones ``regkern.kernels.adam.adam_step``
actually launches: each launch is recorded from a real call on CPU tensors
(the kernels intercepted, nothing run), then, in a subprocess without
``TRITON_INTERPRET`` (the interpreter compiles nothing), bound by triton's own
launch-time binder for each target (so the signature, the constexprs and the
alignment attributes are what a launch on that GPU would compile) and
compiled for sm_80, sm_90 and gfx942. A compile error fails the test; the
registers and spills of every kernel are printed (``pytest -s``) and the hot
specializations must not spill on NVIDIA.

The helpers (:func:`record_launches`, :func:`compile_launches`) take any
kernel module and any launch function, so the other families' kernels can
use them too; ``python tests/test_adam_triton_aot.py`` prints the table.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
                torch.int8: "int8", torch.uint8: "uint8"}


# --------------------------------------------------------------------------
# Recording (this process; the kernels are intercepted, nothing is launched)

def _describe(value):
    """A launch argument as JSON: tensors by dtype and alignment, Triton dtypes by name."""
    import triton.language as tl
    if isinstance(value, torch.Tensor):
        return {"tensor": _DTYPE_NAMES[value.dtype], "aligned16": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if isinstance(value, tl.constexpr):
        return _describe(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"kernel": self.name, "args": [_describe(a) for a in args],
                                  "kwargs": {k: _describe(v) for k, v in kwargs.items()}})
        return launch


@contextlib.contextmanager
def record_launches(module, kernel_names):
    """Within the block, launches of ``module``'s kernels ``kernel_names`` are
    recorded (appended to the yielded list) instead of run."""
    launches = []
    saved = {name: getattr(module, name) for name in kernel_names}
    try:
        for name in kernel_names:
            setattr(module, name, _Recorder(name, launches))
        yield launches
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def unique_launches(launches):
    """The distinct launches (a specialization compiles once)."""
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


# --------------------------------------------------------------------------
# Compiling (a subprocess without TRITON_INTERPRET)

def compile_launches(module_name, launches, targets=TARGETS, jobs=2):
    """Compile each recorded launch of ``module_name``'s kernels for each
    target, one subprocess per target (``jobs`` at a time). Returns
    ``{target: [result per launch]}``, a result being ``{"error": text}`` or
    the kernel's ``registers``, ``spill_stores``, ``spill_loads`` (bytes;
    NVIDIA, from ptxas -v) or ``vgprs``, ``sgprs``, ``scratch`` (bytes),
    ``vgpr_spills``, ``sgpr_spills`` (AMD, from the assembly's metadata)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    results, running = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "launches.json")
        spec.write_text(json.dumps({"module": module_name, "launches": launches}))
        pending = list(targets.items())
        while pending or running:
            while pending and len(running) < jobs:
                name, target = pending.pop(0)
                out = Path(tmp, f"{name}.json")
                proc = subprocess.Popen([sys.executable, __file__, "--compile", str(spec), json.dumps(target),
                                         str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                running.append((name, proc, out))
            name, proc, out = running.pop(0)
            log, _ = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"the {name} compile subprocess failed:\n{log[-4000:]}")
            results[name] = json.loads(out.read_text())
    return results


def _ptxas(capability: int) -> str:
    """The bundled ptxas that triton itself assembles ``capability`` with."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def _nvidia_usage(ptx: str, capability: int, options) -> dict:
    """ptxas -v of the kernel's PTX, with the flags triton assembles it with
    (triton.backends.nvidia.compiler.make_cubin)."""
    arch = re.search(r"^\.target\s+(\S+?)(,|\s|$)", ptx, re.M).group(1)
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not options.enable_fp_fusion:
        flags.append("--fmad=false")
    if options.ptx_options:
        flags += options.ptx_options.split(" ")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        run = subprocess.run([_ptxas(capability), *flags, f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        return {"error": run.stderr[-2000:]}
    text = run.stderr + run.stdout
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups()
    return {"registers": int(re.search(r"Used (\d+) registers", text).group(1)),
            "spill_stores": int(stores), "spill_loads": int(loads)}


def _amd_usage(asm: str) -> dict:
    def field(pattern):
        m = re.search(pattern, asm, re.M)
        return int(m.group(1)) if m else None
    return {"vgprs": field(r"^\s*; TotalNumVgprs:\s*(\d+)"), "sgprs": field(r"^\s*; TotalNumSgprs:\s*(\d+)"),
            "scratch": field(r"^\s*; ScratchSize:\s*(\d+)"),
            "vgpr_spills": field(r"\.vgpr_spill_count:\s*(\d+)") or 0,
            "sgpr_spills": field(r"\.sgpr_spill_count:\s*(\d+)") or 0}


def _compile_main(spec_path, target_json, out_path):
    """Subprocess entry: compile every launch of the spec for one target."""
    import importlib

    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    spec = json.loads(Path(spec_path).read_text())
    module = importlib.import_module(spec["module"])
    target = GPUTarget(*json.loads(target_json))
    backend = make_backend(target)
    dtypes = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

    def build(value):
        if isinstance(value, dict) and "tensor" in value:
            t = torch.empty(8, dtype=dtypes[value["tensor"]])
            return t if value["aligned16"] else t[1:]
        if isinstance(value, dict) and "tl" in value:
            return tl.dtype(value["tl"])
        return value

    results = []
    for launch in spec["launches"]:
        kernel = getattr(module, launch["kernel"])
        args = [build(a) for a in launch["args"]]
        kwargs = {k: build(v) for k, v in launch["kwargs"].items()}
        # launch options this target's compiler does not have (maxnreg on AMD) are
        # left out, as adam_step leaves them out on such a GPU
        known = set(backend.parse_options({}).__dict__) | {p.name for p in kernel.params}
        kwargs = {k: v for k, v in kwargs.items() if k in known}
        kwargs.setdefault("debug", False)
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
        try:
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                      options)
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            usage = _nvidia_usage(compiled.asm["ptx"], target.arch, options) if target.backend == "cuda" else _amd_usage(
                compiled.asm["amdgcn"])
        except Exception as e:  # reported, the test fails on it
            usage = {"error": f"{type(e).__name__}: {e}"[-4000:]}
        results.append(usage)
    Path(out_path).write_text(json.dumps(results))


# --------------------------------------------------------------------------
# The adam kernel's launches

def _adam_launches():
    """Record the launches of adam_step over the configurations a training
    loop uses: ``[(label, hot, launch)]`` (hot: must not spill)."""
    from regkern.backends.adam import build_adam_table
    from regkern.kernels import adam as triton_adam

    def tensors(dtype, shape=(4, 6)):
        w = torch.zeros(shape, dtype=dtype)
        return w, w.clone(), w.clone(), w.clone(), w.clone(), torch.zeros(())

    configs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for coupled in (False, True):
            for grad_scale in (False, True):
                hot = dtype != torch.float16
                if not hot and (coupled or grad_scale):
                    continue
                configs.append((f"adamw {dtype} row-lam {'coupled' if coupled else 'decoupled'}"
                                f"{' grad_scale+found_inf' if grad_scale else ''}", hot, dtype,
                                dict(decay=0.01, weight_decay=0.0, coupled=coupled, amsgrad=False, maximize=False),
                                grad_scale, False))
    configs.append(("adam amsgrad maximize fp32 tensor-lr", False, torch.float32,
                    dict(decay=0.0, weight_decay=0.1, coupled=True, amsgrad=True, maximize=True), False, True))
    configs.append(("adam amsgrad bf16", False, torch.bfloat16,
                    dict(decay=0.0, weight_decay=0.1, coupled=False, amsgrad=True, maximize=False), False, False))
    out = []
    for label, hot, dtype, options, scaled, tensor_lr in configs:
        w, g, m, v, vmax, step = tensors(dtype)
        lam = torch.zeros(w.shape[0])
        table = build_adam_table([w], [g], [m], [v], [vmax if options["amsgrad"] else None], [step], [lam],
                                 [None], [None])
        units = triton_adam.build_units(table)
        extra = {}
        if scaled:
            extra = dict(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(0.0))
        with record_launches(triton_adam, triton_adam.KERNELS) as launches:
            triton_adam.adam_step(table, dtype, units=units, lr=torch.tensor(1e-3) if tensor_lr else 1e-3,
                                  beta1=0.9, beta2=0.999, eps=1e-8, **options, **extra)
        for launch in launches:
            out.append((f"{launch['kernel']} {label}" if launch["kernel"] != "_adam_kernel" else label,
                        hot and launch["kernel"] == "_adam_kernel", launch))
    seen, unique = set(), []
    for label, hot, launch in out:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append((label, hot, launch))
    return unique


def format_table(labels, results):
    lines = [f"{'kernel specialization':58s} " + " ".join(f"{t:>22s}" for t in results)]
    for i, label in enumerate(labels):
        cells = []
        for target, per_launch in results.items():
            r = per_launch[i]
            if "error" in r:
                cells.append(f"{'ERROR':>22s}")
            elif "registers" in r:
                cells.append(f"{r['registers']:>4d} regs {r['spill_stores']:>3d}/{r['spill_loads']:<3d}spill")
            else:
                cells.append(f"{r['vgprs']:>3d}v{r['vgpr_spills']:>2d} {r['sgprs']:>3d}s{r['sgpr_spills']:>3d} "
                             f"{r['scratch']:>2d}B")
        lines.append(f"{label[:58]:58s} " + " ".join(cells))
    return "\n".join(lines)


def test_adam_kernel_compiles_for_gpus_without_spills():
    launches = _adam_launches()
    labels = [label for label, _, _ in launches]
    results = compile_launches("regkern.kernels.adam", [launch for _, _, launch in launches])
    print("\nregisters (NVIDIA: registers, spill stores/loads in bytes; AMD: VGPRs and spilled VGPRs, SGPRs and "
          "SGPRs spilled (to VGPR lanes), scratch bytes)")
    print(format_table(labels, results))
    errors = [f"{target} {labels[i]}: {r['error']}" for target, per in results.items()
              for i, r in enumerate(per) if "error" in r]
    assert not errors, "\n\n".join(errors)
    spilled = [f"{target} {labels[i]}: {r}" for target in ("sm_80", "sm_90")
               for i, (r, (_, hot, _)) in enumerate(zip(results[target], launches))
               if hot and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, "spills in hot specializations:\n" + "\n".join(spilled)
    hot = [label for label, is_hot, _ in launches if is_hot]
    assert len(hot) >= 8, hot  # fp32 / bf16 x coupled / decoupled x with / without grad_scale


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--compile":
        _compile_main(*sys.argv[2:])
    else:
        launches = _adam_launches()
        results = compile_launches("regkern.kernels.adam", [launch for _, _, launch in launches])
        print(format_table([label for label, _, _ in launches], results))
