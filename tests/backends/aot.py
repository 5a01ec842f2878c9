"""Ahead-of-time compiles of regkern's Triton kernels for real GPUs, without a GPU.

What is compiled is what regkern launches: :func:`record_launches` wraps the
interpreter's launch (``TRITON_INTERPRET=1``, CPU tensors) while real steps
run, and notes each launch's kernel, arguments and options. A launch is kept
as its specialization (:func:`canonical`: tensors by dtype and 16-byte
alignment, integers by the properties Triton specializes on, constexprs by
value), so many steps give few compiles.

:func:`compile_specializations` then compiles each specialization for each
target in subprocesses without ``TRITON_INTERPRET`` (the interpreter compiles
nothing), at most two at a time, binding the arguments with Triton's own
launch-time binder (so the signature, the constexprs and the alignment
attributes are those a launch on that GPU compiles). Results are cached for
the session. Each result is a compile error or the kernel's resources:

- NVIDIA: ``registers``, ``spill_stores`` / ``spill_loads`` (bytes, from the
  ``ptxas -v`` of the bundled ptxas, with Triton's flags), and the vector
  global accesses of the PTX: ``v4_loads`` / ``v4_stores`` (16 bytes:
  ``ld.global*.v4.b32``), ``v2_loads`` / ``v2_stores`` (8 bytes);
- AMD: ``vgprs``, ``sgprs``, ``scratch`` (bytes), ``vgpr_spills``,
  ``sgpr_spills`` from the assembly's metadata, and the ``dwordx4`` /
  ``dwordx2`` global and buffer accesses under the same names (the int64
  table entries are ``dwordx2`` loads too).

:func:`format_table` prints one line per specialization and target.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
NVIDIA = ("sm_80", "sm_90")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
                torch.int8: "int8", torch.uint8: "uint8"}


# --------------------------------------------------------------------------
# Recording (an interpreter process; the launches run)

def canonical_int(value: int) -> int:
    """A representative of the integers Triton compiles ``value``'s way: equal
    to 1, a multiple of 16 or not, 32- or 64-bit, signed or not."""
    if value == 1:
        return 1
    odd = 0 if value % 16 == 0 else 3
    if value >= 2 ** 63:
        return 2 ** 63 + 16 + odd
    if not -2 ** 31 <= value < 2 ** 31:
        return 2 ** 40 + odd
    return 32 + odd


def canonical(value, exact: bool = False):
    """A launch argument as JSON, reduced to what its compile depends on
    (``exact``: a constexpr or a launch option, kept as it is)."""
    import triton.language as tl
    if isinstance(value, torch.Tensor):
        return {"tensor": _DTYPE_NAMES[value.dtype], "aligned16": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    if isinstance(value, tl.constexpr):
        return canonical(value.value, exact=True)
    if isinstance(value, bool) or value is None or isinstance(value, str) or exact:
        return value
    if isinstance(value, int):
        return {"int": canonical_int(value)}
    if isinstance(value, float):
        return {"float": 0.5}  # a float argument is fp32 whatever its value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


@dataclass
class Specialization:
    """One compile: ``kernel`` ("module:function"), its canonical arguments and
    options, the label of the first step that launched it, and whether it is
    hot (some step that launched it is normal training: it must not spill)."""
    kernel: str
    args: list
    kwargs: dict
    label: str
    hot: bool = False
    key: str = field(init=False)

    def __post_init__(self):
        self.key = json.dumps([self.kernel, self.args, self.kwargs], sort_keys=True)


@contextlib.contextmanager
def record_launches():
    """Within the block every interpreted Triton launch of a ``regkern``
    kernel runs as usual and is appended, as ``(kernel, args, kwargs)`` in
    canonical form, to the yielded list."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def recorded_run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("regkern."):
            params = inspect.signature(self.fn).parameters
            exact = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
            exact |= set(kwargs) - set(params)  # launch options: num_warps, maxnreg, ...
            launches.append((f"{self.fn.__module__}:{self.fn.__name__}",
                             [canonical(a, name in exact) for a, name in zip(args, params)],
                             {k: canonical(v, k in exact) for k, v in kwargs.items()}))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recorded_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def collect(workloads: Sequence[Tuple[str, bool, Callable[[], None]]]) -> List[Specialization]:
    """Run each ``(label, hot, step)`` under :func:`record_launches` and return
    the distinct specializations launched, in first-launch order. A step that
    launches no kernel is an error (it would test nothing)."""
    import triton
    if not triton.knobs.runtime.interpret:
        raise RuntimeError("recording needs TRITON_INTERPRET=1 (launches on CPU tensors)")
    found: Dict[str, Specialization] = {}
    for label, hot, step in workloads:
        with record_launches() as launches:
            step()
        if not launches:
            raise AssertionError(f"{label}: no Triton kernel was launched")
        for kernel, args, kwargs in launches:
            spec = Specialization(kernel, args, kwargs, f"{kernel.split(':')[1]} {label}", hot)
            if spec.key in found:
                found[spec.key].hot |= hot
            else:
                found[spec.key] = spec
    return list(found.values())


def specializations_to_json(specs: Sequence[Specialization]) -> str:
    return json.dumps([[s.kernel, s.args, s.kwargs, s.label, s.hot] for s in specs])


def specializations_from_json(text: str) -> List[Specialization]:
    return [Specialization(*entry) for entry in json.loads(text)]


# --------------------------------------------------------------------------
# Compiling (subprocesses without TRITON_INTERPRET)

_RESULTS: Dict[Tuple[str, str], dict] = {}  # (target, specialization key) -> result, for the session


def compile_specializations(specs: Sequence[Specialization], targets_of: Callable[[Specialization], Sequence[str]],
                            jobs: int = 2, timeout: float = 900) -> Dict[Tuple[str, str], dict]:
    """Compile every specialization for the targets ``targets_of(spec)`` names
    (each distinct one once per session), in ``jobs`` subprocesses. Returns
    ``{(target, spec.key): result}`` for the pairs asked."""
    wanted = [(t, s) for s in specs for t in targets_of(s)]
    todo = list({(t, s.key): (t, s) for t, s in wanted if (t, s.key) not in _RESULTS}.values())
    if todo:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
        with tempfile.TemporaryDirectory() as tmp:
            procs = []
            for j in range(jobs):
                share = todo[j::jobs]
                if not share:
                    continue
                spec_path, out_path = Path(tmp, f"in{j}.json"), Path(tmp, f"out{j}.json")
                spec_path.write_text(json.dumps([[t, s.kernel, s.args, s.kwargs] for t, s in share]))
                proc = subprocess.Popen([sys.executable, __file__, "--compile", str(spec_path), str(out_path)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                procs.append((proc, share, out_path))
            for proc, share, out_path in procs:
                log, _ = proc.communicate(timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"an AOT compile subprocess failed:\n{log[-4000:]}")
                for (t, s), result in zip(share, json.loads(out_path.read_text())):
                    _RESULTS[(t, s.key)] = result
    return {(t, s.key): _RESULTS[(t, s.key)] for t, s in wanted}


def _vector_pattern(op: str, width: str) -> "re.Pattern":
    """PTX global accesses ``op`` ("ld" or "st") of ``width`` ("v4": 16 bytes,
    "v2": 8 bytes) of 32-bit lanes, predicated or not."""
    return re.compile(rf"^\s*(?:@%p\d+\s+)?{op}\.global(?:\.[\w:]+)*?\.{width}\.(?:b32|f32|u32)\b", re.M)


_PTX_VECTORS = {f"{w}_{kind}s": _vector_pattern(op, w)
                for w in ("v4", "v2") for op, kind in (("ld", "load"), ("st", "store"))}
_AMD_VECTORS = {f"{w}_{kind}s": re.compile(rf"^\s*(?:global|buffer)_{kind}_dword{x}\b", re.M)
                for w, x in (("v4", "x4"), ("v2", "x2")) for kind in ("load", "store")}


def _nvidia_usage(ptx: str, capability: int, options, ptxas_log: str) -> dict:
    """Registers and spills from ``ptxas_log`` (the ``-v`` output of Triton's own
    assembly of the kernel) or, when Triton took the kernel from its cache
    (no log), from ptxas -v run here with Triton's flags
    (triton.backends.nvidia.compiler.make_cubin); the PTX's 16-byte accesses."""
    vectors = {name: len(pattern.findall(ptx)) for name, pattern in _PTX_VECTORS.items()}
    if "Used" in ptxas_log:
        return {**_ptxas_resources(ptxas_log), **vectors}
    from triton.backends.nvidia.compiler import get_ptxas
    arch = re.search(r"^\.target\s+(\S+?)(,|\s|$)", ptx, re.M).group(1)
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"]
    if not options.enable_fp_fusion:
        flags.append("--fmad=false")
    if options.ptx_options:
        flags += options.ptx_options.split(" ")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        run = subprocess.run([get_ptxas(capability).path, *flags, f"--gpu-name={arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        return {"error": run.stderr[-2000:]}
    return {**_ptxas_resources(run.stderr + run.stdout), **vectors}


def _ptxas_resources(log: str) -> dict:
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_stores": int(stores), "spill_loads": int(loads)}


def _amd_usage(asm: str) -> dict:
    def number(pattern):
        m = re.search(pattern, asm, re.M)
        return int(m.group(1)) if m else 0
    return {"vgprs": number(r"^\s*; TotalNumVgprs:\s*(\d+)"), "sgprs": number(r"^\s*; TotalNumSgprs:\s*(\d+)"),
            "scratch": number(r"^\s*; ScratchSize:\s*(\d+)"),
            "vgpr_spills": number(r"\.vgpr_spill_count:\s*(\d+)"),
            "sgpr_spills": number(r"\.sgpr_spill_count:\s*(\d+)"),
            **{name: len(pattern.findall(asm)) for name, pattern in _AMD_VECTORS.items()}}


def _compile_main(spec_path: str, out_path: str) -> None:
    """Subprocess entry: compile each ``[target, kernel, args, kwargs]`` of the spec file."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    dtypes = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    triton.knobs.nvidia.dump_ptxas_log = True

    def build(value):
        if isinstance(value, dict):
            if "tensor" in value:
                t = torch.empty(8, dtype=dtypes[value["tensor"]])
                return t if value["aligned16"] else t[1:]
            if "tl" in value:
                return tl.dtype(value["tl"])
            if "int" in value:
                return value["int"]
            if "float" in value:
                return value["float"]
        return value

    results = []
    for target_name, kernel_name, args, kwargs in json.loads(Path(spec_path).read_text()):
        target = GPUTarget(*TARGETS[target_name])
        backend = make_backend(target)
        module, name = kernel_name.split(":")
        kernel = getattr(importlib.import_module(module), name)
        args = [build(a) for a in args]
        kwargs = {k: build(v) for k, v in kwargs.items()}
        # launch options this target's compiler lacks (maxnreg on AMD) are left
        # out, as the launch code leaves them out on such a GPU
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
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # Triton prints ptxas -v here (dump_ptxas_log)
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            if target.backend == "cuda":
                usage = _nvidia_usage(compiled.asm["ptx"], target.arch, options, log.getvalue())
            else:
                usage = _amd_usage(compiled.asm["amdgcn"])
        except Exception as e:  # reported; the tests fail on it
            usage = {"error": f"{type(e).__name__}: {e}"[-4000:]}
        results.append(usage)
    Path(out_path).write_text(json.dumps(results))


# --------------------------------------------------------------------------
# Reporting

def spills(result: dict) -> int:
    """Bytes (NVIDIA) or registers (AMD) spilled; 0 for an error."""
    if "registers" in result:
        return result["spill_stores"] + result["spill_loads"]
    return result.get("vgpr_spills", 0) + result.get("scratch", 0)


def format_cell(result) -> str:
    if result is None:
        return f"{'-':>32s}"
    if "error" in result:
        return f"{'COMPILE ERROR':>32s}"
    vectors = (f"v4 {result['v4_loads']:>2d}/{result['v4_stores']:<2d} "
               f"v2 {result['v2_loads']:>2d}/{result['v2_stores']:<2d}")
    if "registers" in result:
        return f"{result['registers']:>3d}r {result['spill_stores']:>2d}/{result['spill_loads']:<2d}sp {vectors}"
    return f"{result['vgprs']:>3d}v {result['scratch']:>2d}B {vectors}"


def format_table(specs: Sequence[Specialization], results: Dict[Tuple[str, str], dict],
                 targets: Sequence[str] = tuple(TARGETS)) -> str:
    """One line per specialization (``*``: hot), one column per target."""
    width = 64
    lines = [
        "NVIDIA: registers, spill stores/loads (bytes), then global loads/stores of 16 bytes (v4) and 8 bytes",
        "(v2) in the PTX; AMD: VGPRs, scratch bytes, then global/buffer loads/stores dwordx4 (v4), dwordx2 (v2,",
        "table entries included); '-': not compiled; *: hot (must not spill on NVIDIA)",
        f"{'kernel specialization':{width}s} " + " ".join(f"{t:>32s}" for t in targets),
    ]
    for s in specs:
        cells = " ".join(format_cell(results.get((t, s.key))) for t in targets)
        lines.append(f"{('* ' if s.hot else '  ') + s.label:{width}.{width}s} {cells}")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--compile":
    _compile_main(*sys.argv[2:])
