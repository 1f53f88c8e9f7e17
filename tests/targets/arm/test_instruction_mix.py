"""The static instruction-mix report on objdump listings written here (needs no toolchain):
which instructions count as vector FMAs, how the main loop is found, what the ratio means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detc.compiler.errors import BadInputError
from detc.targets.arm import instruction_mix as mix

#: a kernel with an outer loop around an inner loop of 4 fmla and one q-register reload, then a
#: scalar epilogue loop; and a generic kernel whose loop is scalar fmadd only
LISTING = """
model.so:     file format elf64-littleaarch64

Disassembly of section .text:

0000000000001000 <fused_conv2d_add_compute_>:
    1000:\td10203ff \tsub\tsp, sp, #0x80
    1004:\t3dc00000 \tldr\tq0, [x1]
    1008:\t4f801020 \tfmla\tv0.4s, v1.4s, v0.s[0]
    100c:\t4f801021 \tfmla\tv1.4s, v1.4s, v0.s[1]
    1010:\t3dc00be9 \tldr\tq9, [sp, #32]
    1014:\t4e20cc22 \tfmla\tv2.4s, v1.4s, v0.4s
    1018:\t4f801023 \tfmla\tv3.4s, v1.4s, v0.s[3]
    101c:\tf1000463 \tsubs\tx3, x3, #0x1
    1020:\t54ffff21 \tb.ne\t1004 <fused_conv2d_add_compute_+0x4>  // b.any
    1024:\tf1000484 \tsubs\tx4, x4, #0x1
    1028:\t54fffee1 \tb.ne\t1004 <fused_conv2d_add_compute_+0x4>  // b.any
    102c:\t1f020020 \tfmadd\ts0, s1, s2, s0
    1030:\tb5ffffe5 \tcbnz\tx5, 102c <fused_conv2d_add_compute_+0x2c>
    1034:\td65f03c0 \tret

0000000000002000 <fused_conv2d1>:
    2000:\t1f020020 \tfmadd\ts0, s1, s2, s0
    2004:\t1f020020 \tfmadd\ts3, s1, s2, s3
    2008:\tf1000463 \tsubs\tx3, x3, #0x1
    200c:\t54ffffa1 \tb.ne\t2000 <fused_conv2d1>  // b.any
    2010:\t4e20cc22 \tfmla\tv2.4s, v1.4s, v0.4s
    2014:\td65f03c0 \tret

0000000000003000 <__tvm_ffi_fused_conv2d1>:
    3000:\t4e20cc22 \tfmla\tv2.4s, v1.4s, v0.4s
"""

KERNELS = [
    {"name": "fused_conv2d_add", "schedule": "template", "macs": 3000, "calls": 1},
    {"name": "fused_conv2d1", "schedule": "generic", "macs": 500, "calls": 2},
]


def test_the_listing_splits_into_functions_and_instructions() -> None:
    functions = mix.parse_disassembly(LISTING)
    assert sorted(functions) == [
        "__tvm_ffi_fused_conv2d1",
        "fused_conv2d1",
        "fused_conv2d_add_compute_",
    ]
    first = functions["fused_conv2d_add_compute_"][2]
    assert (first.address, first.mnemonic) == (0x1008, "fmla")
    assert first.is_vector_fma and not first.is_scalar_fma
    # the comment objdump appends to a branch is not an operand
    assert "b.any" not in functions["fused_conv2d_add_compute_"][7].operands


def test_the_main_loop_is_the_innermost_one_with_the_most_fmas() -> None:
    code = mix.parse_disassembly(LISTING)["fused_conv2d_add_compute_"]
    loop = mix.main_loop(code)
    assert (loop[0].address, loop[-1].address) == (0x1004, 0x1020)
    count = mix.FmaCount.of(loop)
    assert (count.vector, count.scalar, count.instructions, count.spills) == (4, 0, 8, 1)
    assert count.vector_fmas_per_mac == pytest.approx(0.25)
    assert mix.main_loop([]) == []


def test_kernels_gather_their_outlined_parallel_bodies_only() -> None:
    functions = mix.parse_disassembly(LISTING)
    assert mix.functions_of("fused_conv2d_add", functions) == ["fused_conv2d_add_compute_"]
    # the FFI wrapper of a kernel is not the kernel
    assert mix.functions_of("fused_conv2d1", functions) == ["fused_conv2d1"]


def test_the_ratio_weights_each_kernel_by_its_macs_per_inference() -> None:
    mixes = mix.kernel_mixes(mix.parse_disassembly(LISTING), KERNELS)
    template, generic = mixes
    assert template.whole.vector == 4 and template.whole.scalar == 1
    assert template.main_loop.vector_fmas_per_mac == pytest.approx(0.25)
    # a scalar loop does none of its multiply-adds in vector FMAs, whatever lies outside it
    assert generic.whole.vector == 1 and generic.main_loop.vector_fmas_per_mac == 0.0
    assert generic.macs == 1000  # 500 per call × 2 calls
    assert mix.model_vector_fmas_per_mac(mixes) == pytest.approx(0.25 * 3000 / 4000)
    lines = mix.summary_lines(mixes)
    assert lines[0].startswith("instruction mix (static, from the disassembly; not a latency)")
    assert "2 of 2 conv kernels hold vector FMAs" in lines[0]
    assert "1 q-register spills" in lines[0]


def test_kernels_without_vector_fmas_are_named() -> None:
    scalar_only = LISTING.replace("fmla\tv2.4s, v1.4s, v0.4s\n    2014", "nop\n    2014")
    mixes = mix.kernel_mixes(mix.parse_disassembly(scalar_only), KERNELS)
    lines = mix.summary_lines(mixes)
    assert "1 of 2 conv kernels hold vector FMAs" in lines[0]
    assert lines[1] == "conv kernels without vector FMAs: fused_conv2d1"


def test_report_refuses_what_is_not_an_arm_artifact(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not a detc artifact"):
        mix.report(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"target": {"machine": "x86_64"}}))
    with pytest.raises(BadInputError, match="not built for an ARM target"):
        mix.report(tmp_path)
    assert mix.main([str(tmp_path)]) == 2
    assert mix.main([]) == 2
