"""Decode + class-aware NMS as one TIR PrimFunc, per built-in decoder family.

The compiled post-processing must return what detc's Python decoders return
(:mod:`detc.compiler.detection.decoders`): the same candidates (each box with its best class,
kept when that score is strictly above ``score_threshold``; YOLOv5 rows also need objectness
above it; boxes with a non-finite coordinate dropped), the same greedy class-aware NMS (a box
is suppressed when its IoU with a kept, higher-scoring box of its class is strictly above
``iou_threshold``; equal scores keep the lower index first), the same ``max_detections`` cap.
Products and box corners are computed in float32 as numpy computes them, IoU in float64.

The candidates are sorted by a stable bottom-up merge sort in TIR (descending score, ties in
row order: what ``np.argsort(-s, kind="stable")`` gives), then kept greedily against the boxes
already kept (at most ``max_detections``). No extern sort (TVM's CPU sort is a packed function
in a library the device may lack): the same code runs wherever the library runs.

The PrimFunc ``(raw, [image,] boxes, scores, classes, count)``: ``raw`` the network output the
decoder reads; ``image`` (h, w, 3) only with preprocessing, read for its size to map boxes back
to original pixels (``(x - left) / gain``, clipped to the image, as
:meth:`LetterboxTransform.boxes_to_original`); outputs padded with zeros past ``count``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detc.compiler.detection.decoders import MAX_NMS_CANDIDATES, YOLOX_STRIDES
from detc.compiler.detection.spec import ModelSpec
from detc.compiler.errors import BadInputError
from detc.targets.prepost.letterbox import OPAQUE_PATTERN, Preprocessing, placement

#: decoder name → the layout of the output it reads
FAMILIES = {
    "yolov5": "objectness",
    "demo": "objectness",
    "yolov8": "no-objectness",
    "yolox": "yolox",
    "yolox-logits": "yolox-logits",
}


@dataclass(frozen=True)
class Postprocessing:
    """What the compiled decode + NMS needs: the family, the raw output's shape, thresholds."""

    decoder: str
    output_shape: tuple[int, ...]
    output_dtype: str
    num_classes: int
    num_rows: int
    channels_first: bool  # yolov8's (1, 4+C, N)
    input_size: tuple[int, int]
    score_threshold: float
    iou_threshold: float
    max_detections: int

    @classmethod
    def from_spec(
        cls, spec: ModelSpec, output_shape: tuple[int, ...], output_dtype: str
    ) -> Postprocessing:
        """BadInputError (one line) when the output cannot be what ``spec.decoder`` reads."""
        decoder = spec.decoder
        if decoder not in FAMILIES:
            raise BadInputError(
                f"--with-nms compiles the built-in decoders ({', '.join(FAMILIES)}), not "
                f"{decoder!r}: drop --with-nms and decode in Python, or name the model's family "
                "with --spec"
            )
        shape = tuple(int(d) for d in output_shape)
        rows = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
        min_columns = 5 if FAMILIES[decoder] == "no-objectness" else 6
        if len(rows) != 2 or min(rows) < min_columns - (FAMILIES[decoder] != "no-objectness"):
            raise BadInputError(
                f"--with-nms: decoder {decoder!r} reads an output (1, N, K) and the model's is "
                f"{list(shape)}; check the spec's decoder and output_name"
            )
        channels_first = FAMILIES[decoder] == "no-objectness" and rows[0] < rows[1]
        num_rows, columns = (rows[1], rows[0]) if channels_first else rows
        num_classes = columns - (4 if FAMILIES[decoder] == "no-objectness" else 5)
        if spec.num_classes is not None and spec.num_classes != num_classes:
            raise BadInputError(
                f"--with-nms: decoder {decoder!r} sees {num_classes} class columns in the output "
                f"{list(shape)} but the spec names {spec.num_classes} classes"
            )
        if num_classes < 1:
            raise BadInputError(f"--with-nms: the output {list(shape)} has no class columns")
        if FAMILIES[decoder].startswith("yolox"):
            height, width = spec.input_size
            cells = sum((height // s) * (width // s) for s in YOLOX_STRIDES)
            if cells != num_rows:
                raise BadInputError(
                    f"--with-nms: decoder {decoder!r} expects {cells} rows for a {height}x{width} "
                    f"input at strides 8/16/32; the output has {num_rows}"
                )
        return cls(
            decoder=decoder,
            output_shape=shape,
            output_dtype=output_dtype,
            num_classes=num_classes,
            num_rows=num_rows,
            channels_first=channels_first,
            input_size=(int(spec.input_size[0]), int(spec.input_size[1])),
            score_threshold=float(spec.score_threshold),
            iou_threshold=float(spec.iou_threshold),
            max_detections=int(spec.max_detections),
        )

    @property
    def exceeds_candidate_cap(self) -> bool:
        """More rows than the Python decoders let into NMS: results may then differ."""
        return self.num_rows > MAX_NMS_CANDIDATES


def detect_func(post: Postprocessing, prep: Preprocessing | None) -> Any:
    """The decode + NMS PrimFunc for ``post`` (boxes back to original pixels with ``prep``)."""
    if prep is None:
        return _detect_func(post, None)
    return _detect_func(post, prep)


def _detect_func(post: Postprocessing, prep: Preprocessing | None) -> Any:
    from tvm.script import tirx as T

    family = FAMILIES[post.decoder]
    rows, classes_count = post.num_rows, post.num_classes
    raw_shape = tuple(T.int64(d) for d in post.output_shape)
    raw_dtype = post.output_dtype
    squeezed = len(post.output_shape) == 3
    channels_first = post.channels_first
    threshold = post.score_threshold
    iou_threshold = post.iou_threshold
    limit = post.max_detections
    class_offset = 4 if family == "no-objectness" else 5
    objectness = family == "objectness"
    yolox = family.startswith("yolox")
    logits = family == "yolox-logits"
    input_h, input_w = post.input_size
    # YOLOX grid: the first row of each stride's level, its columns, its stride
    levels = []
    start = 0
    for stride in YOLOX_STRIDES:
        levels.append((start, input_w // stride, stride))
        start += (input_h // stride) * (input_w // stride)
    mapped = prep is not None
    letterbox = prep.letterbox if prep is not None else False
    centre = prep.centre if prep is not None else False

    def raw_at(raw: Any, row: Any, column: Any) -> Any:
        index = (column, row) if channels_first else (row, column)
        value = raw[(T.int64(0), *index)] if squeezed else raw[index]
        return T.Cast("float32", value)

    def level_value(row: Any, which: int) -> Any:
        """(first row, columns, stride) of the YOLOX level ``row`` is in, as int64."""
        (s0, c0, t0), (s1, c1, t1), (s2, c2, t2) = levels
        values = [(s0, s1, s2), (c0, c1, c2), (t0, t1, t2)][which]
        return T.Select(
            row < T.int64(s1),
            T.int64(values[0]),
            T.Select(row < T.int64(s2), T.int64(values[1]), T.int64(values[2])),
        )

    def score_of(raw: Any, row: Any, column: Any) -> Any:
        value = raw_at(raw, row, column)
        if logits:
            return T.float32(1.0) / (T.float32(1.0) + T.exp(-value))
        return value

    @T.prim_func(private=True)
    def detect(
        var_raw: T.handle,
        var_image: T.handle,
        var_boxes: T.handle,
        var_scores: T.handle,
        var_classes: T.handle,
        var_count: T.handle,
    ):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE_PATTERN})
        h = T.int64()
        w = T.int64()
        raw = T.match_buffer(var_raw, raw_shape, raw_dtype)
        image = T.match_buffer(var_image, (h, w, T.int64(3)), "uint8")  # noqa: F841 (binds h, w)
        boxes = T.match_buffer(var_boxes, (T.int64(limit), T.int64(4)), "float32")
        scores = T.match_buffer(var_scores, (T.int64(limit),), "float32")
        classes = T.match_buffer(var_classes, (T.int64(limit),), "int32")
        count = T.match_buffer(var_count, (T.int64(1),), "int32")
        cand_box = T.alloc_buffer((T.int64(rows), T.int64(4)), "float32")
        cand_score = T.alloc_buffer((T.int64(rows),), "float32")
        cand_class = T.alloc_buffer((T.int64(rows),), "int32")
        alive = T.alloc_buffer((T.int64(rows),), "int8")
        state = T.alloc_buffer((T.int64(3),), "int64")  # candidates, kept, suppressed
        order = T.alloc_buffer((T.int64(rows),), "int64")
        spare = T.alloc_buffer((T.int64(rows),), "int64")
        merge = T.alloc_buffer((T.int64(8),), "int64")
        kept_rows = T.alloc_buffer((T.int64(limit),), "int64")
        best_score = T.alloc_buffer((T.int64(1),), "float32")
        best_class = T.alloc_buffer((T.int64(1),), "int32")
        # ---- decode: every row's box (float32 as numpy), best class, candidate or not
        state[0] = T.int64(0)
        for n in T.serial(T.int64(rows)):
            if yolox:
                first = level_value(n, 0)
                columns = level_value(n, 1)
                stride = T.Cast("float32", level_value(n, 2))
                cell = n - first
                grid_x = T.Cast("float32", T.floormod(cell, columns))
                grid_y = T.Cast("float32", T.floordiv(cell, columns))
                cx = (raw_at(raw, n, 0) + grid_x) * stride
                cy = (raw_at(raw, n, 1) + grid_y) * stride
                bw = T.exp(raw_at(raw, n, 2)) * stride
                bh = T.exp(raw_at(raw, n, 3)) * stride
            else:
                cx = raw_at(raw, n, 0)
                cy = raw_at(raw, n, 1)
                bw = raw_at(raw, n, 2)
                bh = raw_at(raw, n, 3)
            cand_box[n, 0] = cx - bw / T.float32(2.0)
            cand_box[n, 1] = cy - bh / T.float32(2.0)
            cand_box[n, 2] = cx + bw / T.float32(2.0)
            cand_box[n, 3] = cy + bh / T.float32(2.0)
            if objectness or yolox:
                obj = score_of(raw, n, 4)
                best_score[0] = score_of(raw, n, class_offset) * obj
                best_class[0] = 0
                for c in T.serial(T.int64(1), T.int64(classes_count)):
                    product = score_of(raw, n, class_offset + c) * obj
                    if product > best_score[0]:
                        best_score[0] = product
                        best_class[0] = T.Cast("int32", c)
            else:
                best_score[0] = raw_at(raw, n, class_offset)
                best_class[0] = 0
                for c in T.serial(T.int64(1), T.int64(classes_count)):
                    value = raw_at(raw, n, class_offset + c)
                    if value > best_score[0]:
                        best_score[0] = value
                        best_class[0] = T.Cast("int32", c)
            finite = T.And(
                T.And(T.isfinite(cand_box[n, 0]), T.isfinite(cand_box[n, 1])),
                T.And(T.isfinite(cand_box[n, 2]), T.isfinite(cand_box[n, 3])),
            )
            if objectness:
                passes = T.And(
                    T.And(score_of(raw, n, 4) > T.float32(threshold), finite),
                    best_score[0] > T.float32(threshold),
                )
            else:
                passes = T.And(finite, best_score[0] > T.float32(threshold))
            cand_score[n] = best_score[0]
            cand_class[n] = best_class[0]
            alive[n] = T.Cast("int8", passes)
        # ---- the candidates, in descending score (ties: lower row first, as a stable sort)
        state[0] = T.int64(0)
        for n in T.serial(T.int64(rows)):
            if alive[n] == T.int8(1):
                order[state[0]] = n
                state[0] = state[0] + T.int64(1)
        merge[0] = T.int64(1)  # run width of the bottom-up merge sort
        while merge[0] < state[0]:
            merge[1] = T.int64(0)  # start of the pair of runs
            while merge[1] < state[0]:
                merge[2] = T.min(merge[1] + merge[0], state[0])  # end of the left run
                merge[3] = T.min(merge[1] + merge[0] * T.int64(2), state[0])  # of the right
                merge[4] = merge[1]  # next of the left run
                merge[5] = merge[2]  # next of the right run
                merge[6] = merge[1]  # next output
                while merge[6] < merge[3]:
                    merge[7] = T.int64(0)  # 1: take from the left run
                    if merge[4] < merge[2]:
                        # nested: order[end of the right run] must never be read
                        if merge[5] >= merge[3]:  # noqa: SIM114
                            merge[7] = T.int64(1)
                        elif cand_score[order[merge[4]]] >= cand_score[order[merge[5]]]:
                            merge[7] = T.int64(1)
                    if merge[7] == T.int64(1):
                        spare[merge[6]] = order[merge[4]]
                        merge[4] = merge[4] + T.int64(1)
                    else:
                        spare[merge[6]] = order[merge[5]]
                        merge[5] = merge[5] + T.int64(1)
                    merge[6] = merge[6] + T.int64(1)
                merge[1] = merge[3]
            for m in T.serial(state[0]):
                order[m] = spare[m]
            merge[0] = merge[0] * T.int64(2)
        # ---- greedy NMS: a candidate is kept unless a kept box of its class overlaps it more
        # than iou_threshold (what picking the best and dropping its overlaps amounts to)
        state[1] = T.int64(0)
        for m in T.serial(state[0]):
            if state[1] < T.int64(limit):
                n = order[m]
                kept = state[1]
                ax1 = T.Cast("float64", cand_box[n, 0])
                ay1 = T.Cast("float64", cand_box[n, 1])
                ax2 = T.Cast("float64", cand_box[n, 2])
                ay2 = T.Cast("float64", cand_box[n, 3])
                area_a = T.max(ax2 - ax1, T.float64(0.0)) * T.max(ay2 - ay1, T.float64(0.0))
                state[2] = T.int64(0)  # 1: suppressed
                for q in T.serial(kept):
                    other = kept_rows[q]
                    if cand_class[other] == cand_class[n]:
                        bx1 = T.Cast("float64", cand_box[other, 0])
                        by1 = T.Cast("float64", cand_box[other, 1])
                        bx2 = T.Cast("float64", cand_box[other, 2])
                        by2 = T.Cast("float64", cand_box[other, 3])
                        inter = T.max(T.min(ax2, bx2) - T.max(ax1, bx1), T.float64(0.0)) * T.max(
                            T.min(ay2, by2) - T.max(ay1, by1), T.float64(0.0)
                        )
                        area_b = T.max(bx2 - bx1, T.float64(0.0)) * T.max(by2 - by1, T.float64(0.0))
                        union = area_a + area_b - inter
                        if T.And(union > T.float64(0.0), inter / union > T.float64(iou_threshold)):
                            state[2] = T.int64(1)
                if state[2] == T.int64(0):
                    kept_rows[kept] = n
                    if mapped:
                        hf = T.Cast("float64", h)
                        wf = T.Cast("float64", w)
                        new_h, new_w, top, left = placement(
                            h, w, (input_h, input_w), letterbox, centre
                        )
                        gain_y = T.Cast("float64", new_h) / hf
                        gain_x = T.Cast("float64", new_w) / wf
                        boxes[kept, 0] = T.Cast(
                            "float32",
                            T.min(
                                T.max((ax1 - T.Cast("float64", left)) / gain_x, T.float64(0.0)), wf
                            ),
                        )
                        boxes[kept, 1] = T.Cast(
                            "float32",
                            T.min(
                                T.max((ay1 - T.Cast("float64", top)) / gain_y, T.float64(0.0)), hf
                            ),
                        )
                        boxes[kept, 2] = T.Cast(
                            "float32",
                            T.min(
                                T.max((ax2 - T.Cast("float64", left)) / gain_x, T.float64(0.0)), wf
                            ),
                        )
                        boxes[kept, 3] = T.Cast(
                            "float32",
                            T.min(
                                T.max((ay2 - T.Cast("float64", top)) / gain_y, T.float64(0.0)), hf
                            ),
                        )
                    else:
                        for k in T.serial(T.int64(4)):
                            boxes[kept, k] = cand_box[n, k]
                    scores[kept] = cand_score[n]
                    classes[kept] = cand_class[n]
                    state[1] = kept + T.int64(1)
        count[0] = T.Cast("int32", state[1])
        for k in T.serial(state[1], T.int64(limit)):
            scores[k] = T.float32(0.0)
            classes[k] = 0
            for j in T.serial(T.int64(4)):
                boxes[k, j] = T.float32(0.0)

    return detect
