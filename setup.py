"""Build script: the Python packages plus the Cython kernels.

Layout (see README, "Layout"): the hand-written kernels live in the top-level ``kernels/``
folder and are installed as the ``fastops.kernels`` package (``package_dir`` maps it), so each
backend's chapter sits in ``kernels/<backend>/`` while the library around it is ``fastops/``.

Cython extensions are compiled with -O3, OpenMP and, by default, ``-march=native``: the kernels
are built for the CPU they are installed on. Set ``FASTOPS_PORTABLE=1`` for a portable build
(x86-64-v3: AVX2 + FMA) that runs on any CPU of the last decade.
"""
import os
import sys
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def march_flags():
    if os.environ.get("FASTOPS_PORTABLE", "") not in ("", "0"):
        return ["-march=x86-64-v3", "-mtune=generic"]
    return ["-march=native"]


def cython_extensions():
    compile_args = ["-O3", "-fopenmp", "-ffp-contract=fast", *march_flags()]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp by default
        compile_args = [a for a in compile_args if a != "-fopenmp"]
    link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    extensions = []
    for pyx in sorted(glob(os.path.join("kernels", "cython", "*.pyx"))):
        stem = os.path.splitext(os.path.basename(pyx))[0]
        extensions.append(Extension(
            f"fastops.kernels.cython.{stem}", [pyx],
            include_dirs=[numpy.get_include(), os.path.join("kernels", "cython")],
            extra_compile_args=compile_args, extra_link_args=link_args,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        ))
    return cythonize(extensions, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False,
    })


setup(
    packages=["fastops", "fastops.kernels", "fastops.kernels.numba", "fastops.kernels.cython",
              "fastops.kernels.cuda"],
    package_dir={"fastops.kernels": "kernels"},
    package_data={"fastops.kernels.cuda": ["*.cu", "*.cuh"],
                  "fastops.kernels.cython": ["*.pyx", "*.pxd", "*.h"]},
    ext_modules=cython_extensions(),
)
