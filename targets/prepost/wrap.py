"""The ``prepost`` phase: wrap the tuned network in compiled pre- and post-processing.

Runs after tune and before build, so that legalization, layout passes and tuning only ever see
the network: the network's ``main`` (input + parameters) is renamed :data:`NETWORK_FUNCTION`, and
a new ``main`` with the same parameters calls it between the letterbox PrimFuncs
(:mod:`~detc.targets.prepost.letterbox`) and the decode + NMS PrimFunc
(:mod:`~detc.targets.prepost.detect`)::

    main(image (h, w, 3) uint8, *params)             main(images, *params)
      tensor = letterbox(image)                         raw = network(images, *params)
      raw    = network(tensor, *params)                 boxes, scores, classes, count
      boxes, scores, classes, count                       = detect(raw, placeholder)
        = detect(raw, image)

(right: ``--with-nms`` alone; its boxes stay in model-input pixels). The wrapper's calls stay
outside a dataflow block: Relax's dataflow passes read every callee as a scheduled block, and
these PrimFuncs are plain loop nests. No Relax tensor has a size computed from ``h``/``w`` (see
:func:`~detc.targets.prepost.letterbox.letterbox_func`).
"""

from __future__ import annotations

from typing import Any

from detc.compiler.errors import BadInputError
from detc.targets.context import (
    IMAGE_INPUT,
    IMAGE_INPUT_SHAPE,
    NMS_OUTPUTS,
    BuildContext,
    PrepostRequest,
)
from detc.targets.prepost.detect import Postprocessing, detect_func
from detc.targets.prepost.letterbox import Preprocessing, letterbox_func

#: the name the network's own ``main`` gets inside the wrapped module
NETWORK_FUNCTION = "detc_network"


def prepost_io(
    request: PrepostRequest,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's inputs and outputs of a wrapped artifact, from the network's."""
    if request.preprocess:
        inputs = [{"name": IMAGE_INPUT, "shape": list(IMAGE_INPUT_SHAPE), "dtype": "uint8"}]
    if request.nms:
        limit = int(request.spec.max_detections)
        shapes = {"boxes": [limit, 4], "scores": [limit], "classes": [limit], "count": [1]}
        outputs = [
            {"name": name, "shape": shapes[name], "dtype": dtype} for name, dtype, _ in NMS_OUTPUTS
        ]
    return inputs, outputs


def _output_index(network: Any, spec: Any, output_names: list[str]) -> int:
    """Which of the network's outputs the decoder reads (spec.output_name, else the first)."""
    if spec.output_name is None:
        return 0
    if spec.output_name not in output_names:
        raise BadInputError(
            f"--with-nms: the spec's output_name {spec.output_name!r} is not among the model's "
            f"outputs {output_names}"
        )
    return output_names.index(spec.output_name)


def _tensor_info(ty: Any) -> tuple[tuple[int, ...], str]:
    shape = tuple(int(d) for d in ty.shape.values)
    return shape, str(ty.dtype)


def wrap_network(ctx: BuildContext, output_names: list[str]) -> str:
    """The prepost phase: see the module doc. ``output_names``: the model's outputs, in order."""
    import tvm
    from tvm import relax, tirx

    request = ctx.prepost
    assert request is not None, "the prepost phase runs only when asked for"
    spec = request.spec
    if ctx.num_inputs != 1:
        raise BadInputError(
            f"--with-preprocess/--with-nms wrap a network of one image input; this model has "
            f"{ctx.num_inputs} inputs"
        )
    module = ctx.mod
    network = module["main"]
    # the same GlobalVars: the network's body calls its kernels through them
    kept = {var: func for var, func in module.functions.items() if var.name_hint != "main"}
    builder = relax.BlockBuilder(tvm.IRModule(kept, attrs=module.attrs))
    network_var = builder.add_func(
        network.with_attr("global_symbol", NETWORK_FUNCTION), NETWORK_FUNCTION
    )
    network_input = network.params[0]
    weights = [relax.Var(p.name, p.ty) for p in network.params[1:]]
    height, width = tirx.Var("h", "int64"), tirx.Var("w", "int64")
    image = relax.Var(IMAGE_INPUT, relax.TensorType((height, width, 3), "uint8"))
    first = image if request.preprocess else relax.Var("images", network_input.ty)
    prep = Preprocessing.from_spec(spec) if request.preprocess else None
    if prep is not None:
        expected, dtype = _tensor_info(network_input.ty)
        if expected != prep.tensor_shape or dtype != prep.dtype:
            raise BadInputError(
                f"--with-preprocess: the spec makes a {prep.dtype} {list(prep.tensor_shape)} "
                f"tensor ({spec.layout}, input_size {list(spec.input_size)}) but the model takes "
                f"{dtype} {list(expected)}; fix the spec's input_size, layout or dtype"
            )
    summary = []
    with builder.function("main", [first, *weights], {"num_input": 1}):
        if prep is not None:
            input_h, input_w = prep.input_size
            letterbox = builder.add_func(letterbox_func(prep), "letterbox")
            tensor = builder.emit(
                relax.call_tir(letterbox, [image], relax.TensorType(prep.tensor_shape, prep.dtype))
            )
            summary.append(f"letterbox to {input_h}x{input_w}")
        else:
            tensor = first
        result = builder.emit(relax.Call(network_var, [tensor, *weights]))
        if request.nms:
            if isinstance(result.ty, relax.TupleType):
                index = _output_index(network, spec, output_names)
                raw = builder.emit(relax.TupleGetItem(result, index))
            else:
                raw = result
            shape, dtype = _tensor_info(raw.ty)
            post = Postprocessing.from_spec(spec, shape, dtype)
            if post.exceeds_candidate_cap:
                ctx.warn(
                    f"--with-nms: {post.num_rows} rows exceed the Python decoders' cap of "
                    "candidates entering NMS; with that many above the score floor the compiled "
                    "NMS may keep boxes the Python path does not"
                )
            detect = builder.add_func(detect_func(post, prep), "decode_nms")
            # the size source: without preprocessing nothing is mapped back, and a 1x1 image
            # stands in for the argument
            size_source = image if prep is not None else relax.const(_placeholder_image())
            limit = post.max_detections
            result = builder.emit(
                relax.call_tir(
                    detect,
                    [raw, size_source],
                    [
                        relax.TensorType((limit, 4), "float32"),
                        relax.TensorType((limit,), "float32"),
                        relax.TensorType((limit,), "int32"),
                        relax.TensorType((1,), "int32"),
                    ],
                )
            )
            summary.append(f"{post.decoder} decode + class-aware NMS (top {limit})")
        builder.emit_func_output(result)
    ctx.mod = builder.get()
    ctx.num_inputs = 1
    return ", ".join(summary)


def _placeholder_image() -> Any:
    import numpy as np

    return np.zeros((1, 1, 3), dtype=np.uint8)
