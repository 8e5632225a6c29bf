"""Build the Cython kernels.

The layer loops are rendered from ``deepnet/_layer_loops.pxi.tp`` for every built-in activation and
included by ``deepnet/_kernels.pyx``. Compiler flags:

- always ``-O3`` (plus flags that let the compiler vectorise without changing any result:
  ``-fno-math-errno``, ``-fno-trapping-math``; never ``-ffast-math``, which would reassociate sums);
- the instruction set is the compiler's portable default unless ``DEEPNET_MARCH`` is set, e.g.
  ``DEEPNET_MARCH=native pip install .`` builds for this CPU. A build for ``native`` may use
  instructions an older CPU of the same family lacks and would die there with SIGILL, so it is opt-in.
"""

import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from deepnet.activations import BUILTINS  # noqa: E402
from deepnet.kernel_template import render_layer_loops  # noqa: E402


def write_if_changed(path: str, text: str) -> None:
    # Rewriting an unchanged file would make Cython rebuild the extension every time.
    if os.path.exists(path) and open(path).read() == text:
        return
    with open(path, "w") as f:
        f.write(text)


write_if_changed(os.path.join(HERE, "deepnet", "_layer_loops.pxi"), render_layer_loops(BUILTINS))

compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
march = os.environ.get("DEEPNET_MARCH", "").strip()
if march:
    compile_args.append(f"-march={march}")

extensions = [
    Extension(
        "deepnet._kernels",
        ["deepnet/_kernels.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=compile_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(ext_modules=cythonize(extensions, language_level=3, annotate=False))
