"""The demo detector detc ships: a small single-stage, anchor-free, YOLO-like convnet.

Backbone of Conv-BN-SiLU blocks and CSP (C3) residual stages, an SPPF block, a PAN neck
(Upsample + Concat both ways) and a 1x1 prediction conv at strides 8, 16 and 32. The decode runs
inside the graph, so the exported ``output0`` is (1, N, 5 + C) in YOLOv5's layout: cx, cy, w, h
in input pixels, objectness and per-class scores after a sigmoid.

Box parametrisation, per cell (gx, gy) of a level with stride s, from sigmoids p:
    cx = (2 p_x - 0.5 + gx) s        # a centre up to one cell away: 2x2 cells can predict a box
    w  = (2 p_w)^2 · 4 s             # 0 .. 16 s: each level covers a band of sizes around 4 s
The matching training assignment lives in ``demo_train``.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import onnx

#: output strides of the three prediction levels
STRIDES: tuple[int, ...] = (8, 16, 32)
#: the box-size unit of a level, in strides (see the module docstring)
SIZE_UNIT_IN_STRIDES = 4.0
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
ONNX_OPSET = 17


class ConvBnAct(nn.Module):
    """Conv (no bias) → BatchNorm → SiLU; ``padding`` keeps the size at stride 1."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 → 3x3, with an identity shortcut when ``shortcut``."""

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.reduce = ConvBnAct(channels, channels, 1)
        self.spatial = ConvBnAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.spatial(self.reduce(x))
        return x + y if self.shortcut else y


class C3(nn.Module):
    """CSP stage: half the channels go through ``depth`` bottlenecks, half bypass; then merge."""

    def __init__(self, c_in: int, c_out: int, depth: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        hidden = c_out // 2
        self.main = ConvBnAct(c_in, hidden, 1)
        self.bypass = ConvBnAct(c_in, hidden, 1)
        self.blocks = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(depth)))
        self.merge = ConvBnAct(2 * hidden, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.blocks(self.main(x)), self.bypass(x)], dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in // 2
        self.reduce = ConvBnAct(c_in, hidden, 1)
        self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        self.merge = ConvBnAct(4 * hidden, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        p1 = self.pool(x)
        p2 = self.pool(p1)
        return self.merge(torch.cat([x, p1, p2, self.pool(p2)], dim=1))


class DemoDetector(nn.Module):
    """The demo detector. ``forward`` returns decoded (B, N, 5 + C); ``forward_raw`` the logits."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        depths: Sequence[int] = (1, 2, 2, 1),
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 4:
            raise ValueError("widths needs 5 entries (stem..stride 32), depths 4 (one per C3)")
        w0, w1, w2, w3, w4 = widths
        self.num_classes = num_classes
        self.strides = STRIDES
        self.stem = ConvBnAct(3, w0, 3, 2)
        self.stage2 = nn.Sequential(ConvBnAct(w0, w1, 3, 2), C3(w1, w1, depths[0]))
        self.stage3 = nn.Sequential(ConvBnAct(w1, w2, 3, 2), C3(w2, w2, depths[1]))
        self.stage4 = nn.Sequential(ConvBnAct(w2, w3, 3, 2), C3(w3, w3, depths[2]))
        self.stage5 = nn.Sequential(ConvBnAct(w3, w4, 3, 2), C3(w4, w4, depths[3]), SPPF(w4, w4))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        # top-down path
        self.lateral5 = ConvBnAct(w4, w3, 1)
        self.top_down4 = C3(2 * w3, w3, 1, shortcut=False)
        self.lateral4 = ConvBnAct(w3, w2, 1)
        self.top_down3 = C3(2 * w2, w2, 1, shortcut=False)
        # bottom-up path
        self.down3 = ConvBnAct(w2, w2, 3, 2)
        self.bottom_up4 = C3(2 * w2, w3, 1, shortcut=False)
        self.down4 = ConvBnAct(w3, w3, 3, 2)
        self.bottom_up5 = C3(2 * w3, w4, 1, shortcut=False)
        outputs = 5 + num_classes
        self.heads = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in (w2, w3, w4))
        self._init_head_biases()

    def _init_head_biases(self) -> None:
        # YOLOv5's prior: objectness of ~8 objects per 640x640 image and near-uniform class
        # scores, so the first steps are not spent unlearning confident background.
        for head, stride in zip(self.heads, self.strides, strict=True):
            assert isinstance(head, nn.Conv2d) and head.bias is not None
            bias = head.bias.detach()
            bias.zero_()
            bias[4] = float(torch.log(torch.tensor(8.0 / (640 / stride) ** 2)))
            bias[5:] = float(torch.log(torch.tensor(0.6 / (self.num_classes - 0.99))))

    def forward_raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level logits, each (B, 5 + C, H / s, W / s), strides 8, 16, 32."""
        c3 = self.stage3(self.stage2(self.stem(images)))
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        h5 = self.lateral5(c5)
        t4 = self.top_down4(torch.cat([self.upsample(h5), c4], dim=1))
        h4 = self.lateral4(t4)
        p3 = self.top_down3(torch.cat([self.upsample(h4), c3], dim=1))
        p4 = self.bottom_up4(torch.cat([self.down3(p3), h4], dim=1))
        p5 = self.bottom_up5(torch.cat([self.down4(p4), h5], dim=1))
        return [head(feature) for head, feature in zip(self.heads, (p3, p4, p5), strict=True)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return decode(self.forward_raw(images), self.strides)


def level_grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(H·W, 2) cell indices (gx, gy) in row-major order, float32."""
    ys = torch.arange(height, dtype=torch.float32, device=device)
    xs = torch.arange(width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(height * width, 2)


def flatten_level(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) → (B, H·W, K), the row-major cell order of ``output0``."""
    batch, channels, height, width = logits.shape
    return logits.reshape(batch, channels, height * width).permute(0, 2, 1)


def decode_boxes(logits: torch.Tensor, grid: torch.Tensor, stride: int) -> torch.Tensor:
    """Box logits (…, ≥4) of one level → (…, 4) cx, cy, w, h in input pixels."""
    xy = (torch.sigmoid(logits[..., 0:2]) * 2.0 - 0.5 + grid) * stride
    wh = (torch.sigmoid(logits[..., 2:4]) * 2.0) ** 2 * (SIZE_UNIT_IN_STRIDES * stride)
    return torch.cat([xy, wh], dim=-1)


def decode(levels: Sequence[torch.Tensor], strides: Sequence[int] = STRIDES) -> torch.Tensor:
    """Per-level logits → (B, N, 5 + C): cx, cy, w, h (pixels), sigmoid objectness and classes."""
    decoded = []
    for logits, stride in zip(levels, strides, strict=True):
        flat = flatten_level(logits)
        grid = level_grid(int(logits.shape[2]), int(logits.shape[3]), logits.device)
        boxes = decode_boxes(flat, grid, stride)
        decoded.append(torch.cat([boxes, torch.sigmoid(flat[..., 4:])], dim=-1))
    return torch.cat(decoded, dim=1)


def build_demo_model(num_classes: int) -> DemoDetector:
    """The shipped configuration (about 1.8 M parameters, ~0.5 GFLOPs at 256x256)."""
    return DemoDetector(num_classes, widths=(16, 32, 64, 128, 256), depths=(1, 1, 1, 1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, int]) -> int:
    """FLOPs (2 × multiply-accumulates) of the Conv2d layers for one image of ``input_size``."""
    macs = 0

    def on_conv(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Conv2d)
        kernel_h, kernel_w = module.kernel_size
        per_output = (module.in_channels // module.groups) * kernel_h * kernel_w
        macs += output.numel() * per_output

    hooks = [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return 2 * macs


def names_metadata(class_names: Sequence[str]) -> str:
    """Class names as YOLOv5 writes them in ONNX metadata: ``"{0: 'circle', 1: 'square'}"``."""
    return str(dict(enumerate(class_names)))


def parse_names_metadata(text: str) -> list[str]:
    """Inverse of :func:`names_metadata`."""
    names = ast.literal_eval(text)
    return [names[index] for index in sorted(names)]


def export_onnx(
    model: DemoDetector, path: Path, input_size: tuple[int, int], class_names: Sequence[str]
) -> Path:
    """Export un-fused (BatchNormalization kept), opset 17, static 1x3xHxW, with metadata.

    Written to a temporary file beside ``path`` and renamed into place.
    """
    import onnx

    path = Path(path)
    was_training = model.training
    model.eval()
    example = torch.zeros(1, 3, *input_size)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        # The TorchScript exporter's eval-mode peephole folds BatchNorm into Conv; TrainingMode
        # PRESERVE skips that pass while the model itself is in eval mode (running statistics).
        # (The torch.export-based exporter folds BatchNorm too when it optimises, and leaves a
        # graph full of Shape/Expand/CastLike when it does not.)
        with torch.no_grad(), warnings.catch_warnings():
            # expected here: the legacy exporter's deprecation notices, its advice for models in
            # *training* mode, and int() of feature-map sizes (the export is static by design)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*constant folding be turned off.*")
            torch.onnx.export(
                model,
                (example,),
                str(temporary),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=ONNX_OPSET,
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=True,
            )
        proto = onnx.load(str(temporary))
        _inline_initializer_identities(proto)
        del proto.metadata_props[:]
        for key, value in (("stride", str(max(STRIDES))), ("names", names_metadata(class_names))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "detc"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(temporary))
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
        model.train(was_training)
    return path


def _inline_initializer_identities(proto: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer under the output name.

    The TorchScript exporter shares equal-valued parameters (say, two BatchNorms whose running
    means are still zero) through Identity nodes; a plain initializer per use reads better and
    keeps every BatchNormalization's parameters local to it.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in proto.graph.initializer}
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            values = numpy_helper.to_array(initializers[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    used = {name for node in proto.graph.node for name in node.input}
    unused = [init for init in proto.graph.initializer if init.name not in used]
    for init in unused:
        proto.graph.initializer.remove(init)
