"""The static instruction mix of an aarch64 ``model.so``: NEON FMAs per convolution kernel.

No latency can be measured without a board (an emulated run says nothing about time); what the
library itself can show is whether each convolution was compiled to 4-lane vector FMAs. This
module disassembles it (``aarch64-linux-gnu-objdump -d``) and, for every convolution kernel the
build listed (targets/tuning/conv_schedules.py), counts

* ``fmla``/``fmls`` on ``.4s`` registers (4 float32 multiply-adds each) and scalar ``fmadd``
  family instructions on ``s`` registers, in the whole kernel (static counts);
* the same in its *main loop*: the innermost loop (backward branch) that holds the most FMAs,
  with the q registers it spills to and reloads from the stack (a register tile too large).

From the main loop's mix it estimates **vector FMAs per MAC**: ``v / (4 v + s)`` for ``v``
vector and ``s`` scalar FMAs there, i.e. 1/4 when every multiply-add of the loop is a lane of an
``fmla``, 0 when none is. The model's figure weights each kernel by its MACs. This *assumes*
each kernel's multiply-adds run in its main loop with that loop's mix; it is a static property
of the code, not a measurement of speed (register spills, loads per FMA and cache misses are
not in it).

Run on an artifact: ``python -m detc.targets.arm.instruction_mix ARTIFACT_DIR``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detc.compiler.errors import BadInputError, ToolchainMissingError
from detc.targets.remote.toolchain import AARCH64_TRIPLE

#: float32 multiply-adds one 128-bit vector FMA does
LANES = 4

_FUNCTION = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_INSTRUCTION = re.compile(r"^\s*([0-9a-f]+):\s+[0-9a-f]{8}\s+(\S+)\s*(.*)$")
_VECTOR_FMA = re.compile(r"^fml[as]$")
_SCALAR_FMA = re.compile(r"^fn?m(add|sub)$")
_BRANCH_TARGET = re.compile(r"\b([0-9a-f]+) <")
_BRANCHES = ("b", "cbz", "cbnz", "tbz", "tbnz")
_STACK_Q = re.compile(r"^q\d+, (q\d+, )?\[sp\b")


@dataclass(frozen=True)
class Instruction:
    address: int
    mnemonic: str
    operands: str

    @property
    def is_vector_fma(self) -> bool:
        return (
            bool(_VECTOR_FMA.match(self.mnemonic))
            and self.operands.startswith("v")
            and (".4s" in self.operands.split(",")[0])
        )

    @property
    def is_scalar_fma(self) -> bool:
        return bool(_SCALAR_FMA.match(self.mnemonic)) and self.operands.startswith("s")

    @property
    def is_vector_spill(self) -> bool:
        return self.mnemonic.startswith(("ld", "st")) and bool(_STACK_Q.match(self.operands))

    def backward_target(self) -> int | None:
        """The address a backward branch jumps to (None: not a backward branch)."""
        if self.mnemonic not in _BRANCHES and not self.mnemonic.startswith("b."):
            return None
        found = _BRANCH_TARGET.search(self.operands)
        if found is None:
            return None
        target = int(found.group(1), 16)
        return target if target <= self.address else None


@dataclass(frozen=True)
class FmaCount:
    vector: int  # fmla/fmls .4s
    scalar: int  # fmadd/fmsub/fnmadd/fnmsub on s registers
    instructions: int
    spills: int  # loads and stores of q registers from and to the stack (register pressure)

    @classmethod
    def of(cls, instructions: Sequence[Instruction]) -> FmaCount:
        return cls(
            sum(i.is_vector_fma for i in instructions),
            sum(i.is_scalar_fma for i in instructions),
            len(instructions),
            sum(i.is_vector_spill for i in instructions),
        )

    @property
    def vector_fmas_per_mac(self) -> float:
        lanes = LANES * self.vector + self.scalar
        return self.vector / lanes if lanes else 0.0


@dataclass(frozen=True)
class KernelMix:
    """One convolution kernel's static FMA counts (all its functions together)."""

    name: str
    schedule: str
    macs: int  # per inference: MACs of one call × calls
    whole: FmaCount
    main_loop: FmaCount

    def describe(self) -> str:
        loop = self.main_loop
        share = loop.vector / loop.instructions if loop.instructions else 0.0
        return (
            f"{self.name} [{self.schedule}, {_millions(self.macs)} MACs]: {self.whole.vector} "
            f"fmla.4s, {self.whole.scalar} scalar fmadd; main loop {loop.vector} fmla.4s "
            f"({share:.0%} of its {loop.instructions} instructions) + {loop.scalar} scalar, "
            f"{loop.spills} q spills → {loop.vector_fmas_per_mac:.3f} vector FMAs/MAC"
        )


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count / 1e3:.1f} k"


def find_objdump() -> str | None:
    return shutil.which(f"{AARCH64_TRIPLE}-objdump") or shutil.which("llvm-objdump")


def disassemble(library: Path, objdump: str | None = None) -> dict[str, list[Instruction]]:
    """Every function of ``library``'s text, by symbol name."""
    tool = objdump or find_objdump()
    if tool is None:
        raise ToolchainMissingError(
            f"no {AARCH64_TRIPLE}-objdump to disassemble {library.name}; install binutils "
            "(apt-get install binutils-aarch64-linux-gnu)"
        )
    listing = subprocess.run(
        [tool, "-d", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse_disassembly(listing)


def parse_disassembly(listing: str) -> dict[str, list[Instruction]]:
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in listing.splitlines():
        header = _FUNCTION.match(line)
        if header is not None:
            current = functions.setdefault(header.group(2), [])
            continue
        found = _INSTRUCTION.match(line)
        if found is not None and current is not None:
            address, mnemonic, operands = found.groups()
            current.append(Instruction(int(address, 16), mnemonic, operands.split("//")[0]))
    return functions


def main_loop(instructions: Sequence[Instruction]) -> list[Instruction]:
    """The innermost loop (a backward branch and what lies between its target and it) holding
    the most FMAs; empty when no loop holds one."""
    loops = []
    for branch in instructions:
        start = branch.backward_target()
        if start is not None:
            loops.append((start, branch.address))

    def body(span: tuple[int, int]) -> list[Instruction]:
        return [i for i in instructions if span[0] <= i.address <= span[1]]

    def fmas(span: tuple[int, int]) -> int:
        return sum(_is_fma(i) for i in body(span))

    with_fmas = [span for span in loops if fmas(span) > 0]
    innermost = [
        span
        for span in with_fmas
        if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in with_fmas)
    ]
    if not innermost:
        return []
    return body(max(innermost, key=lambda span: (fmas(span), -(span[1] - span[0]))))


def _is_fma(instruction: Instruction) -> bool:
    return instruction.is_vector_fma or instruction.is_scalar_fma


def functions_of(kernel: str, functions: Mapping[str, list[Instruction]]) -> list[str]:
    """The symbols of a kernel: its own and the parallel bodies TVM outlines from it
    (``<kernel>_compute_``…)."""
    return sorted(
        symbol
        for symbol in functions
        if symbol == kernel or symbol.startswith(f"{kernel}_compute_")
    )


def kernel_mixes(
    functions: Mapping[str, list[Instruction]], conv_kernels: Iterable[Mapping[str, Any]]
) -> list[KernelMix]:
    mixes = []
    for kernel in conv_kernels:
        name = str(kernel["name"])
        code = [i for symbol in functions_of(name, functions) for i in functions[symbol]]
        loops = [main_loop(functions[symbol]) for symbol in functions_of(name, functions)]
        loop = max(loops, key=lambda body: sum(_is_fma(i) for i in body), default=[])
        mixes.append(
            KernelMix(
                name,
                str(kernel.get("schedule", "?")),
                int(kernel.get("macs", 0)) * int(kernel.get("calls", 1)),
                FmaCount.of(code),
                FmaCount.of(loop),
            )
        )
    return mixes


def model_vector_fmas_per_mac(mixes: Sequence[KernelMix]) -> float:
    """The kernels' main-loop estimates weighted by their MACs."""
    total = sum(m.macs for m in mixes)
    if not total:
        return 0.0
    return sum(m.macs * m.main_loop.vector_fmas_per_mac for m in mixes) / total


def summary_lines(mixes: Sequence[KernelMix]) -> list[str]:
    if not mixes:
        return ["instruction mix (static): no convolution kernels"]
    without = [m.name for m in mixes if m.whole.vector == 0]
    macs = sum(m.macs for m in mixes)
    fmlas = sum(m.whole.vector for m in mixes)
    lines = [
        f"instruction mix (static, from the disassembly; not a latency): "
        f"{len(mixes) - len(without)} of {len(mixes)} conv kernels hold vector FMAs "
        f"({fmlas} fmla.4s in all) for {_millions(macs)} conv MACs per inference; "
        f"main loops estimate {model_vector_fmas_per_mac(mixes):.3f} vector FMAs per MAC "
        f"(ideal {1 / LANES:.2f}), {sum(m.main_loop.spills for m in mixes)} q-register spills"
    ]
    if without:
        more = f", +{len(without) - 4} more" if len(without) > 4 else ""
        lines.append(f"conv kernels without vector FMAs: {', '.join(without[:4])}{more}")
    return lines


def instruction_mix_lines(library: Path, conv_kernels: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a build reports: the summary, or why there is none (no objdump)."""
    if find_objdump() is None:
        return [f"instruction mix: skipped (no {AARCH64_TRIPLE}-objdump)"]
    return summary_lines(kernel_mixes(disassemble(library), conv_kernels))


def report(artifact: Path) -> list[str]:
    """The summary and one line per convolution kernel of the artifact directory ``artifact``."""
    manifest_path = artifact / "manifest.json"
    if not manifest_path.is_file():
        raise BadInputError(f"{artifact} is not a detc artifact (no manifest.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("target", {}).get("machine") != "aarch64":
        raise BadInputError(f"{artifact} was not built for an ARM target (--target arm)")
    kernels = (manifest.get("tuning") or {}).get("conv_kernels")
    if kernels is None:
        raise BadInputError(f"{artifact} lists no convolution kernels: rebuild it with this detc")
    mixes = kernel_mixes(disassemble(artifact / manifest["library"]), kernels)
    return [*summary_lines(mixes), *(m.describe() for m in mixes)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m detc.targets.arm.instruction_mix ARTIFACT_DIR", file=sys.stderr)
        return 2
    try:
        lines = report(Path(args[0]))
    except (BadInputError, ToolchainMissingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
