"""The outputs of a ``--with-nms`` artifact as detections, as ``detc-run`` prints them.

The contract (issue #20): outputs ``boxes`` float32 (M, 4) x1, y1, x2, y2, ``scores`` float32
(M,), ``classes`` int32 (M,), ``count`` int32 (1,); rows at and after ``count`` are zero. Only
numpy here: a bundle reader without TVM can use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detc.compiler.errors import BadInputError
from detc.targets.context import NMS_OUTPUTS


def gives_detections(outputs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether tensor descriptions (``{"name", "dtype", "shape"}``, as bundle.json lists them)
    are the outputs of ``--with-nms``."""
    by_name = {str(o.get("name")): o for o in outputs}
    return all(
        name in by_name
        and by_name[name].get("dtype") == dtype
        and len(by_name[name].get("shape", ())) == rank
        for name, dtype, rank in NMS_OUTPUTS
    )


def detections_from_outputs(outputs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """``[{"box": [x1, y1, x2, y2], "score": s, "class": c}, ...]``: the first ``count`` rows,
    best first; BadInputError when ``outputs`` are not those of ``--with-nms``."""
    missing = [name for name, _, _ in NMS_OUTPUTS if name not in outputs]
    if missing:
        raise BadInputError(
            f"the model gives no detections (no output {', '.join(missing)}): compile it with "
            "`detc compile --with-nms`"
        )
    boxes = np.asarray(outputs["boxes"], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(outputs["scores"], dtype=np.float32).reshape(-1)
    classes = np.asarray(outputs["classes"]).reshape(-1)
    count = int(np.asarray(outputs["count"]).reshape(-1)[0])
    count = max(0, min(count, boxes.shape[0], scores.shape[0], classes.shape[0]))
    return [
        {
            "box": [float(v) for v in boxes[i]],
            "score": float(scores[i]),
            "class": int(classes[i]),
        }
        for i in range(count)
    ]
