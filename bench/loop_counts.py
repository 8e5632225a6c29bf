"""The instruction counts behind issue 23's "within the distance their counts predict": the hottest loop of
each width-4 16-lane backward piece (two segments recomputed at once, the carry of g, the weight update)
of each activation, read with objdump from the kernel module of the build in use.

    python bench/loop_counts.py [--activations softsign,relu,tanh] [--json-out]

FMA-pipe cycles a layer are for two 256-bit FMA pipes (Zen 3 and Zen 4): a 16-lane multiply or FMA takes
both for a cycle and an 8-lane one one of them; a 16-lane division takes two of their issues and an 8-lane
one one (bench/README.md, "What a 16-lane instruction costs here"); over the layers one pass of the loop
covers. Issue cycles a layer count every vector instruction but moves (shuffles, adds, broadcasts, ...) at
Zen 4's two 16-lane FP instructions a cycle, an 8-lane or narrower one as half, a division or a
two-source permute as two: the bound of a loop whose shuffles, not its multiplies, fill the core (the
update's). Load cycles a layer count the instructions that read memory (a load, a broadcast, an
arithmetic instruction with a memory operand) at two 256-bit loads a cycle, a 512-bit one as two (Zen 4;
issue 23 puts a Zen 3's sustained rate nearer 1.5 a cycle). A piece's bound is the busiest of the three.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import devcli  # bench/, the script's directory
from deepnet.activations import registry
from deepnet.errors import ConfigError
from deepnet.kernels.loader import builtin_module

# Layers one pass of each piece's hottest loop covers (the paired recomputation runs a layer of each of its
# two segments), and the function that holds the loop; where the build runs the pieces on two 8-lane halves
# (the AVX2 build, BLOCK16_HALVES_WIDTH), those, whose recompute2 recomputes its segments in turn.
PIECES = {"recompute2": ("dn_recompute2_block16_{act}_w4", 2), "carry": ("dn_carry_block16_{act}_w4", 1),
          "update": ("dn_update_block16_{act}_w4", 1)}
HALVES_PIECES = {"recompute2": ("dn_recompute_halves_{act}_w4", 1), "carry": ("dn_carry_halves_{act}_w4", 1),
                 "update": ("dn_update_halves_{act}_w4", 1)}
FMA_PIPE = re.compile(r"v(f(n)?m(add|sub)\d*ps|mulps)$")
_LINE = re.compile(r"\s+([0-9a-f]+):\s+(\S+)\s*(.*)")


def _disassemble(so: Path, name: str) -> list[tuple[int, str, str]]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so), f"--disassemble={name}"],
                         capture_output=True, text=True, check=True).stdout
    body = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_LINE.match, out.splitlines()) if m]
    # Identical functions are folded into one: a body that is one jump is the other function's.
    if len(body) == 1 and body[0][1] == "jmp":
        target = re.search(r"<([^>+]+)>", body[0][2])
        return _disassemble(so, target.group(1)) if target else body
    return body


def _fma_pipe_ops(loop: list[tuple[int, str, str]]) -> int:
    return sum(1 for _, op, _ in loop if FMA_PIPE.match(op))


def _fma_pipe_cycles(loop: list[tuple[int, str, str]]) -> float:
    """Cycles of two 256-bit FMA pipes the loop's multiplies, FMAs and divisions take (module docstring)."""
    wide = [1.0 if "zmm" in args else 0.5 for _, op, args in loop if FMA_PIPE.match(op)]
    divisions = [2.0 if "zmm" in args else 1.0 for _, op, args in loop if op == "vdivps"]
    return sum(wide) + sum(divisions)


def _issue_cycles(loop: list[tuple[int, str, str]]) -> float:
    """Cycles of FP issue the loop's vector instructions other than moves take (module docstring)."""
    ops = [(op, args) for _, op, args in loop if op.startswith("v") and not op.startswith(("vmov", "vzero"))]
    return sum((2.0 if op in ("vdivps", "vpermt2ps") else 1.0) * (1.0 if "zmm" in args else 0.5)
               for op, args in ops) / 2


def _operands(args: str) -> list[str]:
    """An AT&T operand list split at its top-level commas (a memory operand's own stay inside it)."""
    parts, depth, current = [], 0, ""
    for ch in args.split("#")[0].strip():
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current] if current else parts


def _loads(loop: list[tuple[int, str, str]]) -> list[tuple[str, str]]:
    """The loop's instructions that read memory: a memory operand before the last (AT&T's destination is
    last, so a store's memory operand is last); prefetches are not loads."""
    found = []
    for _, op, args in loop:
        operands = _operands(args)
        if not op.startswith("prefetch") and any("(" in o for o in operands[:-1]):
            found.append((op, args))
    return found


def _load_cycles(loop: list[tuple[int, str, str]]) -> float:
    """Cycles of the loads at two 256-bit loads a cycle, a 512-bit one taking both (module docstring)."""
    return sum(1.0 if "zmm" in args else 0.5 for _, args in _loads(loop))


def hottest_loop(body: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The loop (a backward conditional jump's target to the jump, with no return inside: an early exit's
    jump back to a shared epilogue is not a loop) with the most multiplies and FMAs: the layer loop, not
    the loads' and stores' loops around it. Of equal ones the first: the update has a copy of its loop
    for each of its flags (DN_CONSTANT_FLAGS), and the first is the one a one-block step runs (first
    block, applied, 16 samples)."""
    best: list[tuple[int, str, str]] = []
    for address, op, args in body:
        target = re.match(r"([0-9a-f]+)", args)
        if op.startswith("j") and op != "jmp" and target and int(target.group(1), 16) < address:
            loop = [x for x in body if int(target.group(1), 16) <= x[0] <= address]
            if any(x[1].startswith("ret") for x in loop):
                continue
            best = loop if _fma_pipe_ops(loop) > _fma_pipe_ops(best) else best
    return best


def counts(so: Path, activation: str, pieces: dict = PIECES) -> dict:
    """Each piece's hottest loop, counted: instructions, FMAs and multiplies, divisions, FMA-pipe cycles and
    issue cycles a layer (None for a piece this build does not have)."""
    result: dict[str, dict | None] = {}
    for piece, (pattern, layers) in pieces.items():
        loop = hottest_loop(_disassemble(so, pattern.format(act=activation)))
        if not loop:
            result[piece] = None
            continue
        result[piece] = {"instructions": len(loop), "fma_mul": _fma_pipe_ops(loop),
                         "div": sum(1 for _, op, _ in loop if op == "vdivps"),
                         "loads": len(_loads(loop)),
                         "fma_pipe_cycles_per_layer": _fma_pipe_cycles(loop) / layers,
                         "issue_cycles_per_layer": _issue_cycles(loop) / layers,
                         "load_cycles_per_layer": _load_cycles(loop) / layers}
    return result


def loop_counts(names: list[str]) -> tuple[Path, dict]:
    """The kernel module of the build in use, and each activation's counts (``counts``)."""
    module = builtin_module(None)
    pieces = HALVES_PIECES if module.BLOCK16_HALVES_WIDTH == 4 and not module.BLOCK16_NATIVE else PIECES
    so = Path(module.__file__)
    return so, {name: counts(so, name, pieces) for name in names}


def main(activations: str | tuple = ("softsign", "relu", "tanh"), json_out: bool = False) -> None:
    """Count the loops of the build in use for each built-in activation named; print a table, or JSON with
    --json-out."""
    names = activations.split(",") if isinstance(activations, str) else [str(a) for a in activations]
    found = [registry.lookup(name) for name in names]
    if not names or any(a is None or not registry.is_builtin(a) for a in found):
        raise ConfigError(f"--activations must name built-in activations ({', '.join(registry.names())}), "
                          f"got {','.join(names)!r}")
    if shutil.which("objdump") is None:
        raise ConfigError("objdump not found: install binutils")
    so, table = loop_counts(names)
    if json_out:
        print(json.dumps({"module": so.name, "counts": table}))
    else:
        print(f"{so.name}: per piece, instructions / FMAs and multiplies / divisions / loads in its hottest "
              "loop, and (FMA-pipe, issue, load) cycles a layer; bound: the busiest of the three, summed")
        for name, pieces in table.items():
            cells = [f"{p} " + (f"{c['instructions']}/{c['fma_mul']}/{c['div']}/{c['loads']} "
                                f"({c['fma_pipe_cycles_per_layer']:.0f}, {c['issue_cycles_per_layer']:.1f}, "
                                f"{c['load_cycles_per_layer']:.1f})" if c else "none") for p, c in pieces.items()]
            bound = sum(max(c["fma_pipe_cycles_per_layer"], c["issue_cycles_per_layer"], c["load_cycles_per_layer"])
                        for c in pieces.values() if c)
            print(f"  {name:<9} " + "  ".join(cells) + f"  bound {bound:.1f}")


if __name__ == "__main__":
    devcli.run(main, "loop_counts")
