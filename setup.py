"""Build fastbn: Cython bridges plus C kernels compiled once per SIMD target.

Each kernel family (src_c/<family>/*_kernels.c) is compiled three times on
x86-64 -- portable baseline, AVX2+FMA, AVX-512 -- into separate objects whose
only exported symbol is a target-suffixed table of function pointers; the
Cython bridge picks a table at run time from the CPU's features.  Never
-march=native: the result must run on any x86-64.

Environment knobs (build time):
  FASTBN_NO_OPENMP=1     build serial kernels even if the compiler has OpenMP
  FASTBN_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer build
  FASTBN_BUILD_ONLY=sub  only build extensions whose name contains `sub`
"""
import os
import platform
import shutil
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")

# Per-target flags.  -mprefer-vector-width=512 because generic tuning would
# otherwise keep AVX-512 code at 256-bit vectors.
SIMD_TARGETS = {"baseline": []}
if IS_X86_64:
    SIMD_TARGETS["avx2"] = ["-mavx2", "-mfma"]
    SIMD_TARGETS["avx512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                              "-mprefer-vector-width=512"]

# No -ffast-math: it would let the compiler drop NaN/inf semantics and
# reassociate the reductions whose order we fix for determinism.  The flags
# below only allow vectorizing sqrt/compare without errno or trap side effects.
KERNEL_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
                 "-Wall", "-Wno-unknown-pragmas"]

SANITIZE = os.environ.get("FASTBN_SANITIZE", "") not in ("", "0")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                  "-fno-sanitize-recover=undefined"] if SANITIZE else []

# extension name -> (Cython source, kernel sources compiled per target)
EXTENSIONS = {
    "fastbn._core": ("fastbn/_core.pyx", []),
    "fastbn._bn": ("fastbn/_bn.pyx", ["src_c/bn/bn_kernels.c"]),
}
if os.path.exists("fastbn/optim/_optim.pyx"):
    EXTENSIONS["fastbn.optim._optim"] = ("fastbn/optim/_optim.pyx", ["src_c/optim/optim_kernels.c"])


def _kernel_headers():
    headers = []
    for root, _dirs, files in os.walk("src_c"):
        headers += [os.path.join(root, f) for f in files if f.endswith(".h")]
    return headers


class BuildExtWithTargets(build_ext):
    """build_ext that detects OpenMP and compiles kernel sources per target."""

    def build_extensions(self):
        self.openmp_flags = self._detect_openmp()
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args) + self.openmp_flags + SANITIZE_FLAGS
            ext.extra_link_args = list(ext.extra_link_args) + self.openmp_flags + SANITIZE_FLAGS
        super().build_extensions()

    def _detect_openmp(self):
        if os.environ.get("FASTBN_NO_OPENMP", "") not in ("", "0"):
            print("fastbn: OpenMP disabled by FASTBN_NO_OPENMP", file=sys.stderr)
            return []
        flag = "-fopenmp"
        tmp = tempfile.mkdtemp()
        try:
            src = os.path.join(tmp, "check_openmp.c")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
            objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            self.compiler.link_executable(objects, "check_openmp", output_dir=tmp, extra_postargs=[flag])
        except Exception:  # any compiler or linker failure means: no OpenMP
            print("fastbn: compiler has no OpenMP; building serial kernels", file=sys.stderr)
            return []
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [flag]

    def build_extension(self, ext):
        kernel_sources = EXTENSIONS[ext.name][1]
        objects = []
        for target, flags in SIMD_TARGETS.items():
            objects += self.compiler.compile(
                kernel_sources,
                output_dir=os.path.join(self.build_temp, "simd", target),
                macros=[("FASTBN_TARGET", target)] + list(ext.define_macros),
                include_dirs=["src_c"],
                extra_postargs=KERNEL_CFLAGS + flags + self.openmp_flags + SANITIZE_FLAGS,
                depends=_kernel_headers(),
            )
        ext.extra_objects = list(ext.extra_objects) + objects
        super().build_extension(ext)


def make_extensions():
    only = os.environ.get("FASTBN_BUILD_ONLY", "")
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
              ("FASTBN_X86_TARGETS", "1" if IS_X86_64 else "0")]
    extensions = []
    for name, (pyx, _kernels) in EXTENSIONS.items():
        if only and only not in name:
            continue
        extensions.append(Extension(
            name, [pyx],
            include_dirs=[np.get_include(), "src_c"],
            define_macros=macros,
            extra_compile_args=["-O3", "-Wno-unknown-pragmas"],
            depends=_kernel_headers(),
        ))
    return cythonize(extensions, compiler_directives={
        "language_level": 3, "boundscheck": False, "wraparound": False,
        "cdivision": True, "initializedcheck": False, "embedsignature": True,
    })


setup(ext_modules=make_extensions(), cmdclass={"build_ext": BuildExtWithTargets})
