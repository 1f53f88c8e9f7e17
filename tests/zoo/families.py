"""The zoo's families: every detector architecture detc is tested on, by name.

Weights are seeded (``torch.manual_seed``) and BatchNorm statistics moved away from the identity,
so two builds of one family are the same model and a wrong fold shows in verification. Inputs are
128-160 px: an untuned TVM build and an emulated aarch64 run of each stay within seconds.
"""

from __future__ import annotations

from torch import nn

from tests.zoo import families_face as face
from tests.zoo import families_tv as tv
from tests.zoo import families_yolo as yolo
from tests.zoo.blocks import Family, randomize_batchnorm, seed_everything

_NCHW_128 = (1, 3, 128, 128)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("yolov5", yolo.YoloV5, _NCHW_128, idioms="anchor grid decode, C3, SPPF"),
        Family("yolov8", yolo.YoloV8, _NCHW_128, idioms="DFL softmax integral, C2f Split"),
        Family("yolox", yolo.YoloX, _NCHW_128, idioms="decoupled obj/cls/reg, exp sizes"),
        Family("nanodet", yolo.NanoDetGFL, _NCHW_128, idioms="GFL, channel shuffle, depthwise"),
        Family("fastestdet", yolo.FastestDet, _NCHW_128, idioms="one scale, softmax, tanh"),
        Family(
            "ssdlite",
            lambda: tv.SSDLite(postprocess=True),
            _NCHW_128,
            idioms="MobileNetV3 SE/Hardswish, priors decode",
        ),
        Family("retinanet", lambda: tv.RetinaNet(postprocess=True), _NCHW_128, idioms="FPN, P6"),
        Family("fcos", lambda: tv.FCOS(postprocess=True), _NCHW_128, idioms="GroupNorm, 0-d Scale"),
        Family("fasterrcnn", tv.TwoStage, _NCHW_128, idioms="RPN, TopK, Gather, Linear head"),
        Family("detr", tv.DETR, _NCHW_128, idioms="MatMul attention, LayerNorm, queries"),
        Family("retinaface", face.RetinaFace, (1, 3, 160, 160), idioms="SSH, landmarks"),
        Family("scrfd", face.SCRFD, _NCHW_128, idioms="distance decode, keypoints"),
        Family("centerface", face.CenterFace, _NCHW_128, idioms="ConvTranspose, max-pool peaks"),
        Family(
            "blazeface",
            face.BlazeFace,
            (1, 128, 128, 3),
            layout="NHWC",
            idioms="NHWC input, 5x5 depthwise, channel Pad",
        ),
        Family("ultraface", face.UltraFace, (1, 3, 120, 160), idioms="non-square, priors"),
        Family("dbtext", face.DBText, _NCHW_128, idioms="bilinear Resize(sizes), ConvTranspose"),
    )
}

#: the same architectures in another form: raw head outputs, batch > 1
VARIANT_FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("ssdlite-raw", lambda: tv.SSDLite(postprocess=False), _NCHW_128),
        Family("retinanet-raw", lambda: tv.RetinaNet(postprocess=False), _NCHW_128),
        Family("fcos-raw", lambda: tv.FCOS(postprocess=False), _NCHW_128),
        Family("yolov8-batch2", yolo.YoloV8, (2, 3, 128, 128)),
    )
}


def family(name: str) -> Family:
    return FAMILIES.get(name) or VARIANT_FAMILIES[name]


def build(name: str) -> nn.Module:
    """The family's model in eval mode, with seeded weights."""
    seed_everything(0)
    return randomize_batchnorm(family(name).build())
