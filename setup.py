"""Build of regkern: the Python packages plus the C++ extension regkern._C.

Package metadata lives in pyproject.toml; this file only adds what it cannot
say: the extension (pybind11 only, no torch headers, so torch is never a build
requirement).
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "regkern._C",
    sorted(glob.glob("csrc/*.cpp")),
    cxx_std=17,
    include_dirs=["csrc"],
    # Headers (csrc/common/ too): a change to one rebuilds the extension, and
    # an sdist carries them.
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.inc", recursive=True)),
    # No -march=native: every kernel family compiles its hot loops for AVX-512,
    # AVX2 and baseline x86-64 (csrc/common/isa_variants.inc) and one is picked
    # at run time. -ffp-contract=off keeps
    # fp32 results identical to torch's (no fused multiply-add contraction).
    # -fno-trapping-math (no FP traps: results unchanged) lets the vectorizer
    # if-convert the branch-free dtype conversions; -fno-math-errno inlines sqrt.
    # -fopenmp links libgomp.so.1, which resolves to the copy torch already
    # loaded (regkern/__init__.py imports torch first): one thread pool.
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-g0"],
    extra_link_args=["-fopenmp"],
)

setup(
    packages=find_packages(include=["regkern", "regkern.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
