"""Build script. Metadata lives in pyproject.toml; this file declares the native extension
``fastddpm._C`` (csrc/), built as DESIGN.md section 5 says:

* the C++ CPU kernels always (OpenMP), unless ``FASTDDPM_NATIVE=0``;
* the CUDA kernels too when torch is a CUDA build, a CUDA toolkit is found, and a GPU is visible
  or ``FASTDDPM_CUDA=1`` asks for them (``FASTDDPM_CUDA=0`` never builds them);
* a failed native build is a warning, never a failed install: the package then runs on its
  pure-PyTorch reference ops, and ``fastddpm info`` says so.

The source list is csrc/sources.txt, shared with CMakeLists.txt. The package list is here too:
benchmarks/ is installed as ``fastddpm.bench``.
"""

import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources():
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("FASTDDPM_CUDA")
    if flag == "0" or torch.version.cuda is None or cuda_home is None:
        return False
    return flag == "1" or torch.cuda.is_available()


def _extensions():
    if os.environ.get("FASTDDPM_NATIVE", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastddpm: torch is not importable at build time; skipping the native extension",
              file=sys.stderr)
        return [], {}

    sources = _sources()
    cuda = _want_cuda(torch, CUDA_HOME)
    if not cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    # -ffp-contract=off: no FMA contraction, so results match the reference op by op;
    # -fno-trapping-math / -fno-math-errno: change no result, but let loops with selects vectorize.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
    # FASTDDPM_CUDA_ARCHS="90" builds for fewer architectures (a quicker build on a known GPU)
    archs = os.environ.get("FASTDDPM_CUDA_ARCHS", "80 90").split()
    nvcc = ["-O3", "-std=c++20", "--fmad=false"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    include = [os.path.join(ROOT, "csrc", "include")]
    nvidia = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if cuda and os.path.isdir(nvidia):
        include.append(os.path.abspath(nvidia))  # pip-installed CUDA headers (cusparse.h, ...)
    kind = CUDAExtension if cuda else CppExtension
    ext = kind("fastddpm._C", sources, include_dirs=include,
               define_macros=[("FASTDDPM_WITH_CUDA", "1")] if cuda else [],
               extra_compile_args={"cxx": cxx, "nvcc": nvcc} if cuda else {"cxx": cxx},
               extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but turn a compiler failure into a warning."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure must not fail the install
                print(f"fastddpm: WARNING: native extension build failed ({e}); "
                      f"the package will use its reference ops", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
# benchmarks/ is the benchmark suite's one home; it ships inside the package as fastddpm.bench, so
# `fastddpm bench` works after `pip install .` (the mapping lives here: pyproject's package
# discovery cannot add a package from another folder).
setup(packages=find_packages(include=["fastddpm", "fastddpm.*"]) + ["fastddpm.bench"],
      package_dir={"fastddpm.bench": "benchmarks"}, ext_modules=ext_modules, cmdclass=cmdclass)
