"""The builds of the kernels: one template, compiled once per instruction set, picked at run time.

Pure Python with no import of the compiled package, so ``setup.py`` reads it before anything is
built. ``setup.py`` compiles ``deepnet._kernels`` for the compiler's portable baseline and, on x86-64,
one more module per entry of ``X86_BUILDS``; ``deepnet.kernels.loader`` loads the fastest one whose CPU check
passes (the check asks the CPU, and the OS for its register state, so nothing dies with SIGILL); a
plugin's activation is compiled with the flags of the build in use (``deepnet.kernels.jit``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Flags every build shares: vectorise without changing any result (never -ffast-math, which would
# reassociate sums and make the kernels disagree with one another and with the reference). -Wno-psabi:
# the vector types pass only between static functions of one module, so GCC's note that their calling
# convention depends on the instruction set is noise.
BASE_FLAGS: tuple[str, ...] = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-Wno-psabi")


@dataclass(frozen=True)
class KernelBuild:
    """One compiled variant of the kernels."""

    name: str                 # what $DEEPNET_KERNELS calls it
    module: str               # the extension module inside ``deepnet``
    flags: tuple[str, ...]    # compiler flags on top of BASE_FLAGS
    built_for: str            # the module's BUILT_FOR, from the compiler's predefined macros
    cpu_check: str | None     # function of the portable module that says whether this CPU runs it


PORTABLE = KernelBuild("portable", "_kernels", (), "", None)
AVX2 = KernelBuild("avx2", "_kernels_avx2", ("-mavx2", "-mfma"), "avx2+fma", "cpu_has_avx2_fma")
# x86-64-v4's vector extensions. The block kernels use 8-float vector types whatever the build, so they
# gain from AVX-512's 32 registers and instructions, not its width; the loops GCC vectorises on its own
# (one sample at a time, at widths without a variant of their own) run faster with 256-bit vectors.
AVX512 = KernelBuild(
    "avx512", "_kernels_avx512",
    ("-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mprefer-vector-width=256"),
    "avx512", "cpu_has_avx512",
)

# The x86-64 builds, fastest first: "auto" takes the first one this CPU runs.
X86_BUILDS: tuple[KernelBuild, ...] = (AVX512, AVX2)
ALL_BUILDS: tuple[KernelBuild, ...] = (PORTABLE,) + tuple(reversed(X86_BUILDS))  # slowest first
CHOICES: tuple[str, ...] = ("auto",) + tuple(b.name for b in ALL_BUILDS)


def by_name(name: str) -> KernelBuild:
    """The build $DEEPNET_KERNELS calls ``name`` (StopIteration if none)."""
    return next(b for b in ALL_BUILDS if b.name == name)


def flags_for(built_for: str) -> tuple[str, ...]:
    """The extra flags of the build whose module reports ``built_for`` (none for the portable one)."""
    for build in X86_BUILDS:
        if build.built_for == built_for:
            return build.flags
    return ()
