"""Host CPU detection for x86: /proc/cpuinfo → an LLVM ``mcpu`` name and a physical core count.

LLVM 22 in the TVM wheel refuses ``mcpu="native"`` (it silently falls back to a generic CPU), so
detc names the CPU itself. The name comes from the vendor/family/model table below and is then
*checked against the feature flags the kernel reports*: a hypervisor may present a recent model
number while masking AVX-512 or AMX, and code compiled for features the CPU does not expose dies
with SIGILL. When a flag the named CPU implies is missing, detection falls back to the highest
x86-64 micro-architecture level (v4/v3/v2) the flags do support.

Also which ISA this machine is, and which one an ELF library is for (:func:`host_machine`,
:func:`library_machine`), as ``platform.machine()`` names them.

Nothing here imports TVM: ``detc targets`` and manifest checks stay cheap.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO_PATH = Path("/proc/cpuinfo")

# x86-64 micro-architecture levels, as the flags Linux prints in /proc/cpuinfo ("pni" is SSE3,
# "abm" carries LZCNT). Each level includes the ones before it.
_LEVEL_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_LEVEL_V3 = _LEVEL_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_LEVEL_V4 = _LEVEL_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_ICELAKE = _LEVEL_V4 | {"avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "gfni", "vaes"}
_SAPPHIRE = _ICELAKE | {"avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}

#: The CPU features (as /proc/cpuinfo names them) code compiled for each ``mcpu`` may use. Only
#: the features that matter for generated kernels are listed; a CPU lacking any of them must not
#: run that code.
REQUIRED_FLAGS: dict[str, frozenset[str]] = {
    "x86-64": frozenset(),
    "x86-64-v2": _LEVEL_V2,
    "x86-64-v3": _LEVEL_V3,
    "x86-64-v4": _LEVEL_V4,
    "haswell": _LEVEL_V3,
    "broadwell": _LEVEL_V3 | {"adx"},
    "skylake": _LEVEL_V3 | {"adx"},
    "alderlake": _LEVEL_V3 | {"avx_vnni"},
    "raptorlake": _LEVEL_V3 | {"avx_vnni"},
    "meteorlake": _LEVEL_V3 | {"avx_vnni"},
    "skylake-avx512": _LEVEL_V4,
    "cascadelake": _LEVEL_V4 | {"avx512_vnni"},
    "cooperlake": _LEVEL_V4 | {"avx512_vnni", "avx512_bf16"},
    "cannonlake": _LEVEL_V4 | {"avx512ifma", "avx512vbmi"},
    "icelake-client": _ICELAKE,
    "icelake-server": _ICELAKE,
    "tigerlake": _ICELAKE,
    "rocketlake": _ICELAKE,
    "sapphirerapids": _SAPPHIRE,
    "emeraldrapids": _SAPPHIRE,
    "graniterapids": _SAPPHIRE | {"amx_fp16"},
    "znver1": _LEVEL_V3,
    "znver2": _LEVEL_V3 | {"clwb"},
    "znver3": _LEVEL_V3 | {"vaes", "vpclmulqdq"},
    "znver4": _ICELAKE | {"avx512_bf16"},
    "znver5": _ICELAKE | {"avx512_bf16", "avx_vnni"},
}

# Intel family 6 model numbers → LLVM CPU names (the client and server parts of one generation
# share a name where LLVM does).
_INTEL_FAMILY6: dict[int, str] = {
    **dict.fromkeys((0x3C, 0x3F, 0x45, 0x46), "haswell"),
    **dict.fromkeys((0x3D, 0x47, 0x4F, 0x56), "broadwell"),
    **dict.fromkeys((0x4E, 0x5E, 0x8E, 0x9E, 0xA5, 0xA6), "skylake"),
    0x55: "skylake-avx512",  # also Cascade Lake / Cooper Lake: told apart by flags below
    0x66: "cannonlake",
    **dict.fromkeys((0x7D, 0x7E), "icelake-client"),
    **dict.fromkeys((0x6A, 0x6C), "icelake-server"),
    **dict.fromkeys((0x8C, 0x8D), "tigerlake"),
    0xA7: "rocketlake",
    **dict.fromkeys((0x97, 0x9A), "alderlake"),
    **dict.fromkeys((0xB7, 0xBA, 0xBF), "raptorlake"),
    **dict.fromkeys((0xAA, 0xAC), "meteorlake"),
    0x8F: "sapphirerapids",
    0xCF: "emeraldrapids",
    **dict.fromkeys((0xAD, 0xAE), "graniterapids"),
}


def _amd_mcpu(family: int, model: int) -> str | None:
    if family == 0x17:  # Zen, Zen+ and Zen 2 share family 17h; Zen 2 has these model ranges
        zen2 = (0x30 <= model <= 0x3F) or model == 0x47 or (0x60 <= model <= 0x7F)
        zen2 = zen2 or (0x84 <= model <= 0x87) or (0x90 <= model <= 0xAF)
        return "znver2" if zen2 else "znver1"
    if family == 0x19:  # Zen 3 and Zen 4 share family 19h
        zen4 = (0x10 <= model <= 0x1F) or (0x60 <= model <= 0x7F) or (0xA0 <= model <= 0xAF)
        return "znver4" if zen4 else "znver3"
    if family == 0x1A:
        return "znver5"
    return None


def _intel_mcpu(family: int, model: int, flags: frozenset[str]) -> str | None:
    if family != 6:
        return None
    name = _INTEL_FAMILY6.get(model)
    if name == "skylake-avx512":
        if "avx512_bf16" in flags:
            return "cooperlake"
        if "avx512_vnni" in flags:
            return "cascadelake"
    return name


def feature_level(flags: Iterable[str]) -> str:
    """The highest x86-64 micro-architecture level (an LLVM CPU name) ``flags`` support."""
    present = frozenset(flags)
    for level, required in (
        ("x86-64-v4", _LEVEL_V4),
        ("x86-64-v3", _LEVEL_V3),
        ("x86-64-v2", _LEVEL_V2),
    ):
        if required <= present:
            return level
    return "x86-64"


def missing_flags(mcpu: str, flags: Iterable[str]) -> list[str]:
    """Features code compiled for ``mcpu`` may use that ``flags`` lack (sorted; [] if none).

    An ``mcpu`` this table does not know is reported as missing nothing: LLVM validates names,
    and refusing to run a library over an unknown name would be worse than trusting the user.
    """
    return sorted(REQUIRED_FLAGS.get(mcpu, frozenset()) - frozenset(flags))


@dataclass(frozen=True)
class HostCpu:
    """What detc knows about the CPU it runs on, and the LLVM ``mcpu`` it compiles for."""

    vendor: str  # "GenuineIntel", "AuthenticAMD", or "unknown"
    model_name: str
    family: int | None
    model: int | None
    physical_cores: int
    logical_cpus: int
    mcpu: str
    #: why ``mcpu`` was chosen (shown by ``detc targets`` and kept in the manifest)
    mcpu_reason: str
    flags: frozenset[str] = field(default_factory=frozenset, repr=False)

    def as_manifest(self) -> dict[str, object]:
        return {
            "vendor": self.vendor,
            "model_name": self.model_name,
            "family": self.family,
            "model": self.model,
            "mcpu": self.mcpu,
            "mcpu_reason": self.mcpu_reason,
            "physical_cores": self.physical_cores,
            "logical_cpus": self.logical_cpus,
        }


def _parse_processors(cpuinfo_text: str) -> list[dict[str, str]]:
    processors: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        if not line.strip():
            if current:
                processors.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        processors.append(current)
    return processors


def _as_int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text is not None else None
    except ValueError:
        return None


def choose_mcpu(
    vendor: str, family: int | None, model: int | None, flags: frozenset[str]
) -> tuple[str, str]:
    """(LLVM mcpu, reason) for a CPU: its own name when the flags back it, else a feature level."""
    named: str | None = None
    if family is not None and model is not None:
        if vendor == "GenuineIntel":
            named = _intel_mcpu(family, model, flags)
        elif vendor == "AuthenticAMD":
            named = _amd_mcpu(family, model)
    level = feature_level(flags)
    if named is None:
        return level, f"{vendor} family {family} model {model} not in detc's table; flags → {level}"
    lacking = missing_flags(named, flags)
    if lacking:
        return level, (
            f"model says {named} but the CPU does not expose {', '.join(lacking[:4])}"
            f"{'…' if len(lacking) > 4 else ''} (masked by a hypervisor?); flags → {level}"
        )
    return named, f"{vendor} family {family:#x} model {model:#x}"


def _usable_cpu_ids() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cgroup_cpu_limit() -> int | None:
    """CPUs a cgroup v2 quota allows (``cpu.max``), rounded up; None when unlimited/unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def parse_cpuinfo(
    cpuinfo_text: str, usable_cpu_ids: set[int] | None = None, cpu_limit: int | None = None
) -> HostCpu:
    """Describe the CPU in a /proc/cpuinfo text (pure: the tests feed it other machines' texts).

    Physical cores are the distinct (physical id, core id) pairs among the usable processors
    (``usable_cpu_ids``: the affinity mask), capped by a cgroup CPU quota (``cpu_limit``):
    hyper-threads share one core's vector units, so they do not add compute threads.
    """
    processors = _parse_processors(cpuinfo_text)
    first = processors[0] if processors else {}
    vendor = first.get("vendor_id", "unknown") or "unknown"
    family = _as_int(first.get("cpu family"))
    model = _as_int(first.get("model"))
    flags = frozenset(first.get("flags", "").split())
    mcpu, reason = choose_mcpu(vendor, family, model, flags)

    usable = [
        p
        for p in processors
        if usable_cpu_ids is None or _as_int(p.get("processor")) in usable_cpu_ids
    ]
    logical = len(usable) or len(usable_cpu_ids or ()) or (os.cpu_count() or 1)
    cores = {(p.get("physical id"), p.get("core id")) for p in usable}
    physical = len(cores) if usable and all(p.get("core id") is not None for p in usable) else 0
    physical = physical or logical
    if cpu_limit is not None:
        physical = min(physical, cpu_limit)
        logical = min(logical, cpu_limit)
    return HostCpu(
        vendor=vendor,
        model_name=first.get("model name", "unknown"),
        family=family,
        model=model,
        physical_cores=max(1, physical),
        logical_cpus=max(1, logical),
        mcpu=mcpu,
        mcpu_reason=reason,
        flags=flags,
    )


@functools.cache
def detect_host_cpu() -> HostCpu:
    """The CPU this process runs on (cached). Without /proc/cpuinfo: generic x86-64, all CPUs."""
    try:
        text = CPUINFO_PATH.read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, _usable_cpu_ids(), _cgroup_cpu_limit())


# ---- which ISA -----------------------------------------------------------------------------

# ELF e_machine values → platform.machine() names
_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}
_HOST_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_machine() -> str:
    machine = platform.machine().lower()
    return _HOST_ALIASES.get(machine, machine)


def library_machine(path: Path) -> str | None:
    """The ISA of the ELF shared object at ``path`` ("x86_64", "aarch64", …); None if not ELF."""
    with path.open("rb") as stream:
        header = stream.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    number = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return _ELF_MACHINES.get(number, f"elf-machine-{number}")
