"""remove-identity: structure, numbers against onnxruntime, and the cases where it must not fire."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from detc.compiler.tolerances import FP32_EXACT
from detc.passes import RemoveIdentityPass
from tests._models import (
    assert_outputs_close,
    explain_reasons,
    make_model,
    op_types,
    random_inputs,
    run_ort,
    value_info,
)

SHAPE = [1, 3, 4, 4]


def _chain_model(rng: np.random.Generator) -> ir.Model:
    """x → Identity → Add(w via Identity) → Dropout(ratio, training_mode=False, unused mask)
    → Relu → Dropout(no training_mode) → Identity → y (graph output)."""
    return make_model(
        [
            helper.make_node("Identity", ["x"], ["x_copy"], name="id_in"),
            helper.make_node("Identity", ["w"], ["w_copy"], name="id_weight"),
            helper.make_node("Add", ["x_copy", "w_copy"], ["a"], name="add"),
            helper.make_node(
                "Dropout", ["a", "ratio", "training"], ["d1", "unused_mask"], name="drop_flagged"
            ),
            helper.make_node("Relu", ["d1"], ["r"], name="relu"),
            helper.make_node("Dropout", ["r"], ["d2"], name="drop_plain"),
            helper.make_node("Identity", ["d2"], ["y"], name="id_out"),
        ],
        [value_info("x", np.float32, SHAPE)],
        [value_info("y", np.float32, SHAPE)],
        {
            "w": rng.normal(size=SHAPE).astype(np.float32),
            "ratio": np.array(0.5, np.float32),
            "training": np.array(False),
        },
    )


def test_identities_and_inference_dropouts_disappear(rng: np.random.Generator) -> None:
    model = _chain_model(rng)
    assert all(c.fires for c in RemoveIdentityPass().explain(model))

    result = RemoveIdentityPass()(model)

    assert result.modified
    assert op_types(model) == ["Add", "Relu"]
    add, relu = list(model.graph)
    assert add.inputs[0] is model.graph.inputs[0]
    assert add.inputs[1] is model.graph.initializers["w"]
    assert relu.inputs[0] is add.outputs[0]
    # the graph output kept its name: Relu's output took it over
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert relu.outputs[0] is model.graph.outputs[0]
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert RemoveIdentityPass()(model).modified is False


def test_result_matches_onnxruntime(rng: np.random.Generator) -> None:
    model = _chain_model(rng)
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)

    assert RemoveIdentityPass()(model).modified

    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def _assert_untouched(model: ir.Model, node: str, reason: str) -> None:
    before = op_types(model)
    assert explain_reasons(RemoveIdentityPass(), model)[node] == reason
    assert RemoveIdentityPass()(model).modified is False
    assert op_types(model) == before


def test_keeps_an_identity_from_graph_input_to_graph_output() -> None:
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"], name="id")],
        [value_info("x", np.float32, SHAPE)],
        [value_info("y", np.float32, SHAPE)],
    )
    _assert_untouched(
        model,
        "id",
        "Identity 'id' copies graph input 'x' to graph output 'y'; "
        "kept so the model keeps both names",
    )


def test_keeps_an_identity_between_two_graph_outputs(rng: np.random.Generator) -> None:
    """onnx-ir's IdentityEliminationPass would leave two outputs named 'y' here and lose 'r'."""
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["y"], name="id"),
        ],
        [value_info("x", np.float32, SHAPE)],
        [value_info("r", np.float32, SHAPE), value_info("y", np.float32, SHAPE)],
    )
    feeds = random_inputs(model, rng)
    expected = run_ort(model, feeds)
    _assert_untouched(
        model,
        "id",
        "Identity 'id' copies graph output 'r' to graph output 'y'; "
        "kept so the model keeps both names",
    )
    assert_outputs_close(run_ort(model, feeds), expected, FP32_EXACT)


def _dropout_model(training: np.ndarray | None, *, mask_reader: bool) -> ir.Model:
    inputs = [value_info("x", np.float32, SHAPE)]
    initializers = {"ratio": np.array(0.5, np.float32)}
    if training is not None:
        initializers["training"] = training
    else:
        inputs.append(helper.make_tensor_value_info("training", onnx.TensorProto.BOOL, []))
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["d", "mask"], name="drop")]
    outputs = [value_info("d", np.float32, SHAPE)]
    if mask_reader:
        nodes.append(
            helper.make_node("Cast", ["mask"], ["m"], name="cast", to=onnx.TensorProto.FLOAT)
        )
        outputs.append(value_info("m", np.float32, SHAPE))
    return make_model(nodes, inputs, outputs, initializers)


@pytest.mark.parametrize(
    ("training", "mask_reader", "reason"),
    [
        (np.array(True), False, "Dropout 'drop' has training_mode=True (it drops values)"),
        (None, False, "Dropout 'drop' training_mode 'training' is not a constant"),
        (np.array(False), True, "Dropout 'drop' mask output 'mask' is used by Cast 'cast'"),
    ],
)
def test_keeps_a_dropout_that_may_drop_or_whose_mask_is_read(
    training: np.ndarray | None, mask_reader: bool, reason: str
) -> None:
    _assert_untouched(_dropout_model(training, mask_reader=mask_reader), "drop", reason)
