"""The arithmetic floor of the reference step, the machine it is computed for, and the limit kernel run
beside deepnet (../shared/limit, compiled here with gcc -O3 -march=native).

The floor of one exact step through L layers of width w at batch B, on C cores that each complete P FMA
lanes a cycle (two FMA pipes of the build's vector width V, 8 for AVX2 and 16 for AVX-512, where the
core's datapath is that wide; AMD's Zen 3 and Zen 4 have two 256-bit pipes, so P = 16 for either build),
at the clock f:

    forward   a dependency chain per layer that no second core shortens: the w dependent FMAs of
              z = h W + b, the activation, the residual FMA h + alpha act(z):
              chain = (w + 1) x FMA_LATENCY + ACTIVATION_LATENCY[act] cycles per layer,
              or, where the layer's w*w*B FMA lanes take the cores longer than that (from width 16
              at batch 16), those: forward = max(chain, w w B / (C P))
    backward  throughput work: recompute, propagated gradient and weight gradient, w*w*B multiply-adds
              each, as 3 w*w*B FMA lanes per layer at C P lanes a cycle (the activation's derivative
              and the update ride along in the gaps; they are not counted)

    floor = L (forward + 3 w w B / (C P)) / f

For the reference (L = 10M, w = 4, B = 16, softsign) on two AVX2 cores at 3 GHz: (5 x 4 + 14) = 34 cycles
of chain and 96 / 4 = 24 cycles of backward per layer, 0.19 s (issue 23). The latencies are Zen 3's, Zen 4's and
Sapphire Rapids' (4-cycle FMA; activation chains from their instruction tables); the clock is measured
with a chain of dependent adds (the limit kernel's own measurement).

Evaluation (forward only, N samples, nothing saved) has as many independent chains as it has vectors of
samples, so it is throughput work, bounded by whichever unit is busier per sample and layer: the FMA
pipes, with w w + w FMA lanes (z = h W + b and the residual), or the divider, with w divisions per
sample where the activation divides (softsign, tanh), at the divider's measured rate per lane
(bench/divider_probe.c, run here: on a Zen 4 an 8-lane vdivps issues every 3 cycles, a 16-lane one
every 6, so the divider, not the FMA pipes, bounds softsign's evaluation there):

    eval floor = L N max((w w + w) / P, w D) / (C f)       D: divider cycles per lane, best vector width
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

from deepnet.kernels.loader import build_label, builtin_module
from deepnet.nn.caches import cache_sizes

FMA_LATENCY = 4
#: Cycles of the activation's dependency chain in the forward (the kernels' instruction sequences).
ACTIVATION_LATENCY = {"relu": 1, "softsign": 14, "tanh": 30}
#: FMA lanes of a build's vectors.
LANES = {"avx512": 16, "avx2": 8, "portable": 4}
#: AMD CPU families whose FMA pipes are 256 bits wide (family 25: Zen 3 and Zen 4, the latter running a
#: 512-bit instruction as two halves); family 26 (Zen 5) and Intel's AVX-512 cores have 512-bit pipes.
AMD_256_BIT_FAMILIES = {23, 25}

#: Divisions per unit and sample in the activation's forward (dn_tanhf is a rational function: one).
DIVISIONS = {"relu": 0, "softsign": 1, "tanh": 1}

LIMIT_DIR = Path(__file__).resolve().parents[2] / "shared" / "limit"
DIVIDER_PROBE = Path(__file__).resolve().parent / "divider_probe.c"
_STEP_LINE = re.compile(r"median ([0-9.]+) s")
_CLOCK = re.compile(r"clock~([0-9.]+)GHz")
_INFER_2T = re.compile(r"inference B=\d+ L=\d+ 2T: median ([0-9.]+) s")
_PROBE = re.compile(r"clock_ghz ([0-9.]+) div8_cycles ([0-9.]+)(?: div16_cycles ([0-9.]+))?")


def fma_lanes_per_cycle(build: str, vendor: str, family: int | None) -> int:
    """FMA lanes one core completes a cycle with the build's vectors: two pipes, each as wide as the
    build's vectors or the core's datapath, whichever is narrower."""
    lanes = LANES[build]
    if vendor == "AuthenticAMD" and family in AMD_256_BIT_FAMILIES:
        lanes = min(lanes, 8)
    return 2 * lanes


def floor_seconds(*, layers: int, width: int, batch: int, activation: str, lanes_per_cycle: int, cores: int,
                  clock_hz: float) -> dict:
    """The floor of the module docstring, and its two parts, in seconds (``lanes_per_cycle``: P, one
    core's FMA lanes a cycle, ``fma_lanes_per_cycle``)."""
    chain = (width + 1) * FMA_LATENCY + ACTIVATION_LATENCY[activation]
    forward = max(chain, width * width * batch / (cores * lanes_per_cycle))
    backward = 3 * width * width * batch / (cores * lanes_per_cycle)
    return {"forward_chain_cycles_per_layer": chain, "forward_cycles_per_layer": forward,
            "backward_cycles_per_layer": backward,
            "floor_forward_s": layers * forward / clock_hz, "floor_backward_s": layers * backward / clock_hz,
            "floor_s": layers * (forward + backward) / clock_hz}


def eval_floor_seconds(*, layers: int, width: int, samples: int, activation: str, lanes_per_cycle: int,
                       cores: int, clock_hz: float, division_cycles_per_lane: float) -> dict:
    """The evaluation floor of the module docstring (its D given as ``division_cycles_per_lane``, what the
    function of that name derives from the probe), its two bounds in cycles per sample and layer on one
    core, and the images a second it allows."""
    fma = (width * width + width) / lanes_per_cycle
    division = width * DIVISIONS[activation] * division_cycles_per_lane
    seconds = layers * samples * max(fma, division) / (cores * clock_hz)
    return {"eval_fma_cycles_per_sample_layer": fma, "eval_division_cycles_per_sample_layer": division,
            "eval_floor_s": seconds, "eval_floor_images_per_s": samples / seconds}


def division_cycles_per_lane(build: str, divider: dict) -> float:
    """The divider's cycles per lane at the best vector width the build has (16 lanes only in the AVX-512
    build), from ``measure_divider``'s figures."""
    per_lane = [divider["div8_cycles"] / 8]
    if build == "avx512" and divider.get("div16_cycles"):
        per_lane.append(divider["div16_cycles"] / 16)
    return min(per_lane)


def _compile(source: Path, exe: str) -> bool:
    """gcc -O3 -march=native: whether it compiled (False without gcc)."""
    try:
        subprocess.run(["gcc", "-O3", "-march=native", "-pthread", str(source), "-lm", "-o", exe],
                       check=True, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def measure_divider() -> dict | None:
    """Run bench/divider_probe.c here: the clock (GHz) and the cycles between two independent 8-lane
    divisions (and 16-lane ones where the CPU has AVX-512). None without gcc."""
    with tempfile.TemporaryDirectory(prefix="deepnet-probe-") as tmp:
        exe = os.path.join(tmp, "probe")
        if not _compile(DIVIDER_PROBE, exe):
            return None
        done = subprocess.run([exe], check=True, capture_output=True, text=True, timeout=300)
    found = _PROBE.search(done.stdout)
    if found is None:
        return None
    return {"clock_ghz": float(found.group(1)), "div8_cycles": float(found.group(2)),
            "div16_cycles": float(found.group(3)) if found.group(3) else None}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(fields: dict[str, str] | None = None) -> str:
    """The CPU's model name with its family and model numbers (/proc/cpuinfo, or its ``fields`` already
    read: "AMD EPYC" alone does not tell a Zen 3 from a Zen 5), else the platform's processor string."""
    fields = _cpuinfo() if fields is None else fields
    if "model name" not in fields:
        return platform.processor() or "unknown"
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def build_in_use() -> str:
    """The kernel build deepnet runs here ("avx512", "avx2" or "portable")."""
    name = builtin_module(None).__name__.rsplit(".", 1)[-1]
    return name.rsplit("_", 1)[-1] if name.startswith("_kernels_") else "portable"


def limit_source(build: str) -> Path | None:
    """The limit kernel for a build (w4.c for AVX-512, w4_avx2.c for AVX2), None if there is none."""
    name = {"avx512": "w4.c", "avx2": "w4_avx2.c"}.get(build)
    path = LIMIT_DIR / name if name else None
    return path if path is not None and path.is_file() else None


def _run_limit(build: str, args: list[str]) -> tuple[str, str] | None:
    """Compile the limit kernel of a build and run it with ``args``: its file name and output. None when
    there is no kernel for the build or no gcc."""
    source = limit_source(build)
    if source is None:
        return None
    with tempfile.TemporaryDirectory(prefix="deepnet-limit-") as tmp:
        exe = os.path.join(tmp, "w4")
        if not _compile(source, exe):
            return None
        done = subprocess.run([exe, *args], check=True, capture_output=True, text=True, timeout=3600)
    return source.name, done.stdout.strip()


def run_limit_kernel(build: str, layers: int, reps: int, sub: int = 1000) -> dict | None:
    """Compile and run the limit kernel's two-thread step (``step2h``) at ``layers``; its median seconds
    and the clock it measured. None when there is no kernel for the build or no gcc."""
    chunk = min(sub, layers)
    ran = _run_limit(build, ["step2h", str(layers), str(chunk), str(chunk), str(reps)])
    if ran is None:
        return None
    name, output = ran
    step = _STEP_LINE.search(output)
    clock = _CLOCK.search(output)
    return {"limit_kernel": name, "limit_s_per_step": float(step.group(1)) if step else None,
            "clock_ghz": float(clock.group(1)) if clock else None, "limit_output": output}


def run_limit_infer(build: str, layers: int, samples: int, reps: int) -> dict | None:
    """Compile and run the limit kernel's evaluation (``infer``, ``samples`` a multiple of 16) at
    ``layers``: its two-thread median seconds and images a second. None when there is no kernel for the
    build or no gcc."""
    chunk = min(100_000, layers)
    ran = _run_limit(build, ["infer", str(layers), str(chunk), str(chunk), str(reps), str(samples)])
    if ran is None:
        return None
    name, output = ran
    found = _INFER_2T.search(output)
    seconds = float(found.group(1)) if found else None
    return {"limit_kernel": name, "limit_eval_s": seconds,
            "limit_eval_images_per_s": samples / seconds if seconds else None, "limit_output": output}


def machine_facts() -> dict:
    """The CPU model, ISA build, cores, L1d/L2 sizes (bytes) of the machine measuring."""
    sizes = cache_sizes()
    info = _cpuinfo()
    family = int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None
    build = build_in_use()
    return {"cpu": cpu_model(info), "build": build, "build_label": build_label(builtin_module(None)),
            "fma_lanes_per_cycle": fma_lanes_per_cycle(build, info.get("vendor_id", ""), family),
            "cores": len(os.sched_getaffinity(0)),
            "l1d_bytes": sizes.get(1), "l2_bytes": sizes.get(2)}
