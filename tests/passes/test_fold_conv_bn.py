"""fold-conv-bn: structure, numbers against onnxruntime, and the cases where it must not fire."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler.tolerances import FP16, FP32_EXACT
from detc.passes import FoldConvBatchNormPass
from tests._models import (
    assert_outputs_close,
    batchnorm_params,
    constant,
    conv_bn_model,
    conv_params,
    explain_reasons,
    make_model,
    op_types,
    random_inputs,
    run_ort,
    value_info,
)

# (groups, in_channels, out_channels, conv bias, parameters in Constant nodes)
VARIANTS = {
    "plain": (1, 4, 8, True, False),
    "plain-no-bias": (1, 4, 8, False, False),
    "grouped": (2, 4, 8, True, False),
    "grouped-no-bias": (2, 4, 8, False, False),
    "depthwise": (8, 8, 8, True, False),
    "depthwise-no-bias-constant-nodes": (8, 8, 8, False, True),
}


def _variant(rng: np.random.Generator, key: str, dtype: type = np.float32) -> ir.Model:
    groups, cin, cout, bias, constant_nodes = VARIANTS[key]
    return conv_bn_model(
        rng,
        groups=groups,
        in_channels=cin,
        out_channels=cout,
        bias=bias,
        constant_nodes=constant_nodes,
        dtype=dtype,
    )


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_batchnorm_disappears_into_the_conv(rng: np.random.Generator, key: str) -> None:
    model = _variant(rng, key)
    assert [op for op in op_types(model) if op != "Constant"] == ["Conv", "BatchNormalization"]
    assert FoldConvBatchNormPass().explain(model)[0].fires

    result = FoldConvBatchNormPass()(model)

    assert result.modified
    assert op_types(model) == ["Conv"]
    conv = next(iter(model.graph))
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert conv.outputs[0] is model.graph.outputs[0]
    assert len(conv.inputs) == 3 and conv.inputs[2] is not None
    # the BN parameters went with it; only the folded weight and bias stay
    assert sorted(str(v.name) for v in conv.inputs[1:] if v) == sorted(model.graph.initializers)
    assert FoldConvBatchNormPass()(model).modified is False


@pytest.mark.parametrize("key", sorted(VARIANTS))
def test_folded_model_matches_onnxruntime_fp32(rng: np.random.Generator, key: str) -> None:
    model = _variant(rng, key)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert FoldConvBatchNormPass()(model).modified

    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


@pytest.mark.parametrize("key", ["plain", "grouped-no-bias", "depthwise"])
def test_fp16_model_folds_within_fp16_tolerance(rng: np.random.Generator, key: str) -> None:
    model = _variant(rng, key, dtype=np.float16)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert FoldConvBatchNormPass()(model).modified

    conv = next(iter(model.graph))
    assert constant(conv.inputs[1]).dtype == np.float16
    assert constant(conv.inputs[2]).dtype == np.float16
    assert_outputs_close(run_ort(model, feeds), expected, FP16)


def test_shared_weight_gets_a_folded_copy_per_conv(rng: np.random.Generator) -> None:
    """Two Conv+BN blocks reading one weight initializer: each folds its own BN only."""
    weight, _ = conv_params(
        rng, in_channels=4, out_channels=4, groups=1, kernel=3, dtype=np.float32
    )
    initializers = {"w": weight}
    nodes = []
    for i, source in enumerate(["x", "y0"]):
        params = batchnorm_params(rng, 4, np.float32)
        initializers.update({f"{k}{i}": v for k, v in params.items()})
        nodes.append(
            helper.make_node("Conv", [source, "w"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4)
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"gamma{i}", f"beta{i}", f"mean{i}", f"var{i}"],
                [f"y{i}"],
                name=f"bn{i}",
            )
        )
    model = make_model(
        nodes,
        [value_info("x", np.float32, [1, 4, 5, 5])],
        [value_info("y1", np.float32, [1, 4, 5, 5])],
        initializers,
    )
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert FoldConvBatchNormPass()(model).modified

    assert op_types(model) == ["Conv", "Conv"]
    first, second = list(model.graph)
    assert first.inputs[1] is not second.inputs[1]
    # the last reader of the original weight updated it in place; nothing else is left over
    assert len(model.graph.initializers) == 4
    for conv in (first, second):
        assert not np.array_equal(constant(conv.inputs[1]), weight)
    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def _assert_untouched(model: ir.Model, node: str, reason: str) -> None:
    before = op_types(model)
    assert explain_reasons(FoldConvBatchNormPass(), model)[node] == reason
    assert FoldConvBatchNormPass()(model).modified is False
    assert op_types(model) == before


def test_does_not_fire_when_conv_output_has_another_reader(rng: np.random.Generator) -> None:
    model = conv_bn_model(rng, extra_conv_reader=True)
    _assert_untouched(model, "bn", "Conv 'conv' output also feeds 'extra'")


def test_does_not_fire_in_training_mode(rng: np.random.Generator) -> None:
    model = conv_bn_model(
        rng, bn_attributes={"training_mode": 1}, bn_extra_outputs=("running_mean", "running_var")
    )
    _assert_untouched(model, "bn", "BatchNormalization 'bn' has training_mode=1")


def test_does_not_fire_after_a_relu(rng: np.random.Generator) -> None:
    params = batchnorm_params(rng, 3, np.float32)
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="r1"),
            helper.make_node(
                "BatchNormalization", ["r", "gamma", "beta", "mean", "var"], ["y"], name="bn3"
            ),
        ],
        [value_info("x", np.float32, [1, 3, 4, 4])],
        [value_info("y", np.float32, [1, 3, 4, 4])],
        params,
    )
    _assert_untouched(
        model, "bn3", "input of BatchNormalization 'bn3' is produced by Relu 'r1', not a Conv"
    )


def test_does_not_fire_on_a_runtime_weight(rng: np.random.Generator) -> None:
    params = batchnorm_params(rng, 8, np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node(
                "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn"
            ),
        ],
        [value_info("x", np.float32, [1, 4, 3, 3]), value_info("w", np.float32, [8, 4, 1, 1])],
        [value_info("y", np.float32, [1, 8, 3, 3])],
        params,
    )
    _assert_untouched(model, "bn", "Conv 'conv' weight 'w' is not a constant")
