"""quantize: int8 QDQ scale math by hand, calibration methods on known data, structure, fp16."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from PIL import Image

from detc.compiler.errors import BadInputError
from detc.compiler.ir.pipeline import parse_pipeline
from detc.compiler.tolerances import FP16
from detc.passes.calibration import calibration_feeds
from detc.passes.quantize.core import QuantizeOptions, QuantizePass
from detc.passes.quantize.mixed_precision import sqnr_db
from detc.passes.quantize.qdq import quantized_nodes
from detc.passes.quantize.ranges import activation_ranges
from tests._models import (
    assert_outputs_close,
    explain_reasons,
    make_model,
    op_types,
    run_ort,
    value_info,
)

SIZE = 8
#: what int8 QDQ of the two-Conv fixture must keep of the float outputs (measured: ~38 dB)
SQNR_BUDGET_DB = 30.0


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def two_convs(rng: np.random.Generator) -> ir.Model:
    """x (3 ch) -> Conv 'c1' 3x3 to 8 -> Relu 'r1' -> Conv 'c2' 1x1 to 4 -> y."""
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3))
    w1 *= np.array([0.05, 0.2, 0.5, 1, 2, 3, 5, 8])[:, None, None, None]  # unequal channels
    inits = {
        "w1": w1.astype(np.float32),
        "b1": rng.normal(0, 0.5, 8).astype(np.float32),
        "w2": rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32),
        "b2": rng.normal(0, 0.5, 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="c2"),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, 4, SIZE, SIZE])],
        inits,
    )


def _quantize(model: ir.Model, **options) -> QuantizePass:
    pass_ = QuantizePass(QuantizeOptions(**options))
    pass_(model)
    return pass_


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _dequantize_of(model: onnx.ModelProto, node_name: str, index: int) -> onnx.NodeProto:
    """The DequantizeLinear feeding input ``index`` of node ``node_name``."""
    consumer = next(n for n in model.graph.node if n.name == node_name)
    producer = next(n for n in model.graph.node if consumer.input[index] in n.output)
    assert producer.op_type == "DequantizeLinear", producer
    return producer


def _attribute(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return found[0] if found else default


# --- int8: the numbers ------------------------------------------------------------------------


def test_per_channel_weight_scales_are_max_abs_over_127(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = two_convs(rng)
    w1 = _constants(ir.serde.serialize_model(model))["w1"].astype(np.float64)
    b1 = _constants(ir.serde.serialize_model(model))["b1"].astype(np.float64)
    feeds = calibration_feeds(model, calib_dir, max_images=6)
    ranges = activation_ranges(model, feeds, op_types=["Conv"], method="minmax")
    _quantize(model, calib=calib_dir, method="minmax")
    proto = ir.serde.serialize_model(model)
    constants = _constants(proto)

    weight = _dequantize_of(proto, "c1", 1)
    codes, scale, zero = (constants[name] for name in weight.input)
    expected_scale = np.abs(w1).reshape(8, -1).max(axis=1) / 127.0
    assert _attribute(weight, "axis", 1) == 0
    assert codes.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    expected_codes = np.clip(np.round(w1 / expected_scale[:, None, None, None]), -127, 127)
    np.testing.assert_array_equal(codes, expected_codes)

    activation = _dequantize_of(proto, "c1", 0)
    _, act_scale, act_zero = (constants.get(name) for name in activation.input)
    low, high = ranges["x"]  # calibration images scaled to [0, 1]
    assert act_zero is not None and act_zero.dtype == np.uint8
    assert act_scale == pytest.approx((max(high, 0.0) - min(low, 0.0)) / 255.0, rel=1e-6)
    assert abs(int(act_zero) - (-min(low, 0.0) / float(act_scale))) <= 0.5 + 1e-6

    bias = _dequantize_of(proto, "c1", 2)
    bias_codes, bias_scale, _ = (constants[name] for name in bias.input)
    assert bias_codes.dtype == np.int32
    np.testing.assert_allclose(bias_scale, float(act_scale) * expected_scale, rtol=1e-6)
    np.testing.assert_array_equal(bias_codes, np.round(b1 / bias_scale))


@pytest.mark.parametrize("op, trans_b, axis", [("Gemm", 0, 1), ("Gemm", 1, 0), ("MatMul", 0, 1)])
def test_dense_weights_are_scaled_per_output_column(
    rng: np.random.Generator, op: str, trans_b: int, axis: int
) -> None:
    weight = rng.normal(0, 1, (6, 20) if trans_b else (20, 6)).astype(np.float32)
    weight *= np.linspace(0.1, 4, 6).reshape((6, 1) if trans_b else (1, 6)).astype(np.float32)
    node = helper.make_node(op, ["x", "w"], ["y"], name="dense")
    if op == "Gemm":
        node.attribute.append(helper.make_attribute("transB", trans_b))
    model = make_model(
        [node],
        [value_info("x", np.float32, [4, 20])],
        [value_info("y", np.float32, [4, 6])],
        {"w": weight},
    )
    feeds = [{"x": rng.normal(0, 1, (4, 20)).astype(np.float32)} for _ in range(4)]
    from detc.passes.quantize.calibrate import calibrate_model

    proto = calibrate_model(model, feeds, method="minmax").quantize()
    dequantize = _dequantize_of(proto, "dense", 1)
    scale = _constants(proto)[dequantize.input[1]]
    assert _attribute(dequantize, "axis", 1) == axis
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=1 - axis) / 127.0, rtol=1e-6)


def test_symmetric_activations_are_int8_with_zero_point_0(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = two_convs(rng)
    feeds = calibration_feeds(model, calib_dir, max_images=6)
    ranges = activation_ranges(model, feeds, op_types=["Conv"], method="minmax", symmetric=True)
    _quantize(model, calib=calib_dir, method="minmax", activations="symmetric")
    proto = ir.serde.serialize_model(model)
    constants = _constants(proto)
    _, scale, zero = (constants.get(name) for name in _dequantize_of(proto, "c2", 0).input)
    low, high = ranges["r1"]
    assert scale is not None and zero is not None
    assert zero.dtype == np.int8 and int(zero) == 0
    assert scale == pytest.approx(max(abs(low), abs(high)) / 127.0, rel=1e-6)


def identity_conv(size: int) -> ir.Model:
    """x (1, 1, size, size) -> 1x1 Conv of weight 1 -> y: calibration sees x itself."""
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [value_info("x", np.float32, [1, 1, size, size])],
        [value_info("y", np.float32, [1, 1, size, size])],
        {"w": np.ones((1, 1, 1, 1), np.float32)},
    )


def _ranges(model: ir.Model, arrays: list[np.ndarray], method: str, **options) -> tuple:
    feeds = [{"x": a.astype(np.float32)} for a in arrays]
    return activation_ranges(model, feeds, op_types=["Conv"], method=method, **options)["x"]


def test_calibration_methods_on_known_distributions(rng: np.random.Generator) -> None:
    model = identity_conv(64)
    shape = (1, 1, 64, 64)
    uniform = [rng.uniform(-2, 3, shape) for _ in range(8)]
    values = np.concatenate([a.astype(np.float32).ravel() for a in uniform])
    lowest, highest = float(values.min()), float(values.max())
    assert _ranges(model, uniform, "minmax") == (lowest, highest)
    low, high = _ranges(model, uniform, "percentile", percentile=99.9)
    q_low, q_high = np.quantile(values, [0.0005, 0.9995])
    assert lowest < low and high < highest  # it clips
    assert low == pytest.approx(q_low, abs=0.01) and high == pytest.approx(q_high, abs=0.01)
    # clipping a uniform only hurts: mse keeps all of it, KL (coarser) most of it
    for method, kept in (("entropy", 0.85), ("mse", 0.98)):
        low, high = _ranges(model, uniform, method)
        assert lowest <= low <= kept * lowest and kept * highest <= high <= highest, method

    outliers = [rng.normal(0, 1, shape) for _ in range(8)]
    outliers[0].flat[:3] = [40.0, -40.0, 40.0]
    assert _ranges(model, outliers, "minmax") == (-40.0, 40.0)
    values = np.concatenate([a.astype(np.float32).ravel() for a in outliers])
    low, high = _ranges(model, outliers, "percentile", percentile=99.9)
    q_low, q_high = np.quantile(values, [0.0005, 0.9995])
    assert low == pytest.approx(q_low, abs=0.5) and high == pytest.approx(q_high, abs=0.5)
    low, high = _ranges(model, outliers, "entropy")  # KL ignores three values in 32768
    assert -10.0 < low < -2.0 and 2.0 < high < 10.0
    low, high = _ranges(model, outliers, "mse")  # their squared error outweighs the rounding
    assert -40.0 <= low < -30.0 and 30.0 < high <= 40.0


def test_mse_clips_a_rare_outlier_where_rounding_costs_more() -> None:
    """2M values uniform in [-1, 1] and one 20: clipping at c costs (20 - c)^2, the step of
    [-1, c] costs N (c + 1)^2 / (255^2 * 12): the least sum is at c ~ 4.7."""
    rng = np.random.default_rng(5)
    arrays = [rng.uniform(-1, 1, (1, 1, 512, 512)) for _ in range(8)]
    arrays[0].flat[0] = 20.0
    low, high = _ranges(identity_conv(512), arrays, "mse")
    assert low == pytest.approx(-1.0, abs=0.02)
    assert high == pytest.approx(4.7, abs=0.3)


# --- int8: the graph ----------------------------------------------------------------------------


def test_qdq_structure(rng: np.random.Generator, calib_dir: Path) -> None:
    model = two_convs(rng)
    pass_ = _quantize(model, calib=calib_dir)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert sorted(op_types(model)) == sorted(
        ["QuantizeLinear", "DequantizeLinear"] * 2
        + ["DequantizeLinear"] * 4  # weights and biases of both Convs
        + ["Conv", "Relu", "Conv"]
    )
    constants = _constants(proto)
    for conv in ("c1", "c2"):
        data, weight, bias = (_dequantize_of(proto, conv, i) for i in range(3))
        assert [constants[weight.input[0]].dtype, constants[bias.input[0]].dtype] == [
            np.int8,
            np.int32,
        ]
        quantize = next(n for n in proto.graph.node if data.input[0] in n.output)
        assert quantize.op_type == "QuantizeLinear"
        assert constants[quantize.input[2]].dtype == np.uint8
    outputs_read_by_q = {
        i for n in proto.graph.node if n.op_type == "QuantizeLinear" for i in n.input
    }
    assert "y" not in outputs_read_by_q  # Conv outputs stay float by default
    assert [(v.name, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]] == [
        ("x", ir.DataType.FLOAT),
        ("y", ir.DataType.FLOAT),
    ]
    report = pass_.report
    assert report is not None and [d.name for d in report.quantized] == ["c1", "c2"]
    assert report.calib_images == 6 and report.method == "percentile"

    with_outputs = two_convs(np.random.default_rng(0))
    _quantize(with_outputs, calib=calib_dir, quantize_outputs=True)
    assert op_types(with_outputs).count("QuantizeLinear") == 4  # c1 out, r1, c2 out, x


def test_onnxruntime_runs_it_within_the_sqnr_budget(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = two_convs(rng)
    float_proto = ir.serde.serialize_model(model)
    feeds = calibration_feeds(model, calib_dir, max_images=6)
    _quantize(model, calib=calib_dir)
    expected = [run_ort(float_proto, f)["y"] for f in feeds]
    actual = [run_ort(model, f)["y"] for f in feeds]
    assert sqnr_db(expected, actual) > SQNR_BUDGET_DB
    assert sqnr_db(expected, actual) < 80.0  # it did quantize something


def test_exclude_keeps_the_named_layer_float(rng: np.random.Generator, calib_dir: Path) -> None:
    model = two_convs(rng)
    pass_ = _quantize(model, calib=calib_dir, exclude="c2")
    assert quantized_nodes(ir.serde.serialize_model(model)) == {"c1"}
    assert pass_.report is not None
    kept = {d.name: d.reason for d in pass_.report.layers if not d.quantized}
    assert kept == {"c2": "Conv 'c2' is excluded (option exclude)"}


def test_does_not_fire_without_matmul_like_ops_or_with_all_excluded(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    plain = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "shift"], ["y"], name="add"),
        ],
        [value_info("x", np.float32, [1, 3, 4, 4])],
        [value_info("y", np.float32, [1, 3, 4, 4])],
        {"shift": rng.normal(size=(1, 3, 1, 1)).astype(np.float32)},
    )
    before = onnx.printer.to_text(ir.serde.serialize_model(plain))
    assert QuantizePass()(plain).modified is False  # no calib needed when nothing is quantized
    assert onnx.printer.to_text(ir.serde.serialize_model(plain)) == before

    model = two_convs(rng)
    options = QuantizeOptions(calib=calib_dir, exclude="c1|c2")
    assert explain_reasons(QuantizePass(options), model) == {
        "c1": "Conv 'c1' is excluded (option exclude)",
        "c2": "Conv 'c2' is excluded (option exclude)",
    }
    before = onnx.printer.to_text(ir.serde.serialize_model(model))
    assert QuantizePass(options)(model).modified is False
    assert onnx.printer.to_text(ir.serde.serialize_model(model)) == before

    runtime_weight = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [value_info("x", np.float32, [1, 3, 4, 4]), value_info("w", np.float32, [8, 3, 1, 1])],
        [value_info("y", np.float32, [1, 8, 4, 4])],
    )
    assert explain_reasons(QuantizePass(), runtime_weight) == {
        "conv": "Conv 'conv' has no constant float32 weight"
    }


def test_int8_needs_calibration_images(rng: np.random.Generator) -> None:
    with pytest.raises(BadInputError, match="int8 needs calibration images: give calib=DIR"):
        QuantizePass()(two_convs(rng))


def test_pipeline_text_round_trips_and_bad_options_are_refused(calib_dir: Path) -> None:
    text = f"fold-constants,quantize{{calib={calib_dir},method=entropy,max_map_drop=1.0}}"
    pipeline = parse_pipeline(text)
    assert str(pipeline) == text
    pass_ = pipeline.instantiate()[1]
    assert isinstance(pass_, QuantizePass) and pass_.options.max_map_drop == 1.0
    assert pass_.exact is False
    with pytest.raises(BadInputError, match="method='median': choose minmax"):
        parse_pipeline("quantize{method=median}").instantiate()
    with pytest.raises(BadInputError, match="has no option 'bits'"):
        parse_pipeline("quantize{bits=4}").instantiate()


# --- float16 --------------------------------------------------------------------------------------


def fp16_model(rng: np.random.Generator) -> ir.Model:
    """Conv -> Sigmoid -> Mul (SiLU) -> Resize x2 (float32 scales) and a 1x1 Conv -> Concat -> y."""
    inits = {
        "w": rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(0, 0.2, 4).astype(np.float32),
        "w2": rng.normal(0, 0.4, (4, 3, 1, 1)).astype(np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4, strides=[2, 2]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["c", "s"], ["m"], name="silu"),
        helper.make_node("Resize", ["m", "", "scales"], ["up"], name="resize", mode="nearest"),
        helper.make_node("Conv", ["x", "w2"], ["p"], name="pointwise"),
        helper.make_node("Concat", ["up", "p"], ["y"], name="concat", axis=1),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, 8, SIZE, SIZE])],
        inits,
    )


def _onnxruntime_graph(model: ir.Model) -> list[str]:
    """The op types onnxruntime runs the model as (its own Casts included), optimizations off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "seen.onnx")
        ort.InferenceSession(
            ir.serde.serialize_model(model).SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("policy", ["onnxruntime", "all"])
def test_fp16_keeps_float32_io_and_fp16_numerics(rng: np.random.Generator, policy: str) -> None:
    model = fp16_model(rng)
    feeds = {"x": rng.uniform(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)}
    expected = run_ort(model, feeds)
    pass_ = _quantize(model, mode="fp16", fp16_policy=policy)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_outputs_close(run_ort(model, feeds), expected, FP16)
    assert [(v.name, v.dtype) for v in [*model.graph.inputs, *model.graph.outputs]] == [
        ("x", ir.DataType.FLOAT),
        ("y", ir.DataType.FLOAT),
    ]
    weights = model.graph.initializers
    assert weights["w"].dtype == weights["w2"].dtype == ir.DataType.FLOAT16
    assert weights["scales"].dtype == ir.DataType.FLOAT  # Resize's scales are float32 by schema
    report = pass_.report
    assert report is not None and report.float16 is not None
    if policy == "all":
        assert sorted(report.float16.converted) == sorted(
            ["conv", "sigmoid", "silu", "resize", "pointwise", "concat"]
        )
        assert op_types(model).count("Cast") == 2  # x in, y out
    else:
        # what runs in float16 is what onnxruntime has kernels for: it inserts no Cast of its own
        assert _onnxruntime_graph(model) == op_types(model)


def test_fp16_converts_what_onnxruntime_has_a_float16_kernel_for(
    rng: np.random.Generator,
) -> None:
    """Concat has a float16 kernel in every onnxruntime CPU build; Conv has none on x86."""
    model = make_model(
        [
            helper.make_node("Concat", ["x", "pad"], ["joined"], name="concat", axis=1),
            helper.make_node("Transpose", ["joined"], ["y"], name="transpose", perm=[0, 1, 3, 2]),
        ],
        [value_info("x", np.float32, [1, 3, 4, 4])],
        [value_info("y", np.float32, [1, 5, 4, 4])],
        {"pad": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)},
    )
    feeds = {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)}
    expected = run_ort(model, feeds)
    pass_ = _quantize(model, mode="fp16")
    assert pass_.report is not None and pass_.report.float16 is not None
    assert pass_.report.float16.converted == ["concat", "transpose"]
    assert op_types(model) == ["Cast", "Concat", "Transpose", "Cast"]
    assert _onnxruntime_graph(model) == op_types(model)
    assert_outputs_close(run_ort(model, feeds), expected, FP16)


def test_fp16_exclude_keeps_node_and_weights_float32(rng: np.random.Generator) -> None:
    model = fp16_model(rng)
    pass_ = _quantize(model, mode="fp16", fp16_policy="all", exclude="pointwise")
    assert model.graph.initializers["w2"].dtype == ir.DataType.FLOAT
    assert model.graph.initializers["w"].dtype == ir.DataType.FLOAT16
    assert pass_.report is not None and pass_.report.float16 is not None
    assert pass_.report.float16.kept == {"pointwise": "excluded (option exclude)"}


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_yolov5n_int8_keeps_coco64_map_within_one_point(
    yolov5n_path: Path, coco64_dir: Path
) -> None:
    from detc.compiler.driver import optimize
    from detc.passes.quantize.mixed_precision import MapMeter

    loaded, _ = optimize(yolov5n_path, "default")
    float_proto = ir.serde.serialize_model(loaded.model)
    pass_ = QuantizePass(QuantizeOptions(calib=coco64_dir))
    assert pass_(loaded.model).modified
    assert pass_.report is not None and len(pass_.report.quantized) == 60
    meter = MapMeter(coco64_dir, float_proto, decoder="yolov5")
    drop = 100 * (meter(float_proto) - meter(ir.serde.serialize_model(loaded.model)))
    assert drop < 1.0  # measured 0.05 points (percentile 99.999, 32 images)


def two_branches(rng: np.random.Generator) -> ir.Model:
    """x -> Conv 'a' and Conv 'b' (both read x, as a C3 block's two branches do) -> Add -> y."""
    inits = {name: rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32) for name in ("wa", "wb")}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="a"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="b"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    return make_model(
        nodes,
        [value_info("x", np.float32, [1, 3, SIZE, SIZE])],
        [value_info("y", np.float32, [1, 4, SIZE, SIZE])],
        inits,
    )


def test_a_float_layer_reading_a_shared_dequantized_input_is_not_counted_int8(
    rng: np.random.Generator, calib_dir: Path
) -> None:
    model = two_branches(rng)
    pass_ = _quantize(model, calib=calib_dir, exclude="b")
    proto = ir.serde.serialize_model(model)
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    reads = {n.name: [producers.get(i) for i in n.input] for n in proto.graph.node}
    # the excluded conv reads the shared Q/DQ of x with its float weight
    assert reads["b"] == ["DequantizeLinear", None]
    assert quantized_nodes(proto) == {"a"}
    assert pass_.report is not None
    assert {d.name for d in pass_.report.layers if not d.quantized} == {"b"}


def test_an_opset_11_model_is_converted_not_refused(rng: np.random.Generator, calib_dir: Path):
    model = two_convs(rng)
    model.opset_imports[""] = 11
    _quantize(model, calib=calib_dir)  # "per-channel int8 needs opset >= 13 ... convert it" before
    proto = ir.serde.serialize_model(model)
    assert next(o.version for o in proto.opset_import if o.domain == "") >= 13
    onnx.checker.check_model(proto, full_check=True)
    assert op_types(model).count("QuantizeLinear") == 2
