"""The grouping of bench_layers.py: convolution keys from either runtime, and what is decode."""

from __future__ import annotations

from tests.bench.bench_layers import Call, conv_key, detc_conv_key, detc_kind, mark_decode


def test_blocked_conv_arguments_give_the_onnx_shape() -> None:
    shapes = [(1, 3, 640, 640), (1, 3, 6, 6, 1, 16), (1, 16, 1, 1), (1, 1, 320, 320, 16)]
    assert detc_conv_key(shapes) == "conv6x6 s2 3→16 @320x320"
    blocked = [(1, 4, 80, 80, 16), (8, 4, 3, 3, 16, 16), (1, 8, 1, 1, 16), (1, 8, 40, 40, 16)]
    assert detc_conv_key(blocked) == conv_key(64, 128, 3, 3, 2, 40, 40)


def test_output_channels_are_padded_to_the_block_on_both_sides() -> None:
    # OpenVINO sees the head's 255 channels, detc's blocked layout 256: one group
    assert conv_key(64, 255, 1, 1, 1, 80, 80) == conv_key(64, 256, 1, 1, 1, 80, 80)
    assert conv_key(64, 255, 1, 1, 1, 80, 80) != conv_key(64, 240, 1, 1, 1, 80, 80)


def test_only_what_feeds_no_convolution_is_decode() -> None:
    calls = [
        Call("conv_a", "conv", "conv a", conv=True),
        Call("concatenate", "concat", "concat", inputs=[0]),
        Call("conv_b", "conv", "conv b", inputs=[1], conv=True),
        Call("vm.builtin.alloc_tensor", "vm", "vm"),
        Call("fused_reshape_sigmoid", "other", "other", inputs=[2]),
        Call("concatenate1", "concat", "concat", inputs=[4]),
    ]
    mark_decode(calls)
    assert [c.key for c in calls] == ["conv a", "concat", "conv b", "vm", "decode", "decode"]


def test_kernel_names_map_to_kinds() -> None:
    assert detc_kind("fused_conv2d_add_sigmoid_multiply_layout_transform") == "conv"
    assert detc_kind("vm.builtin.alloc_storage") == "vm"
    assert detc_kind("max_pool2d") == "pool"
    assert detc_kind("fused_unblock_resize2d_unblock1_concatenate5_layout_transform1") == "resize"
    assert detc_kind("fused_reshape_transpose") == "other"
