"""Compiled pre- and post-processing (``detc compile --with-preprocess / --with-nms``, issue #20).

letterbox.py  the model spec's letterbox/resize (Pillow's bilinear), channel order and
              normalisation as one TIR PrimFunc over a uint8 RGB image of any size
detect.py     decode (yolov5/demo, yolov8, yolox, yolox-logits) + class-aware NMS as one PrimFunc
wrap.py       the ``prepost`` build phase: the tuned network's ``main`` wrapped between them
"""

from __future__ import annotations

from detc.targets.prepost.detect import FAMILIES, Postprocessing, detect_func
from detc.targets.prepost.letterbox import Preprocessing, letterbox_func, placement
from detc.targets.prepost.wrap import NETWORK_FUNCTION, prepost_io, wrap_network

__all__ = [
    "FAMILIES",
    "NETWORK_FUNCTION",
    "Postprocessing",
    "Preprocessing",
    "detect_func",
    "letterbox_func",
    "placement",
    "prepost_io",
    "wrap_network",
]
