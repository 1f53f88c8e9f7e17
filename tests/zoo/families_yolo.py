"""Single-stage grid detectors: YOLOv5 (anchors), YOLOv8/v11 (DFL), YOLOX (decoupled), NanoDet /
PicoDet (GFL, depthwise, channel shuffle) and FastestDet (one scale, ShuffleNet)."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo.blocks import ConvBnAct, DepthwiseSeparable, FeaturePyramid, Residual, grid_centres

NUM_CLASSES = 4


class C3(nn.Module):
    """YOLOv5's CSP block: two 1x1 branches, bottlenecks on one, concat, 1x1."""

    def __init__(self, c_in: int, c_out: int, depth: int = 1) -> None:
        super().__init__()
        hidden = c_out // 2
        self.cv1 = ConvBnAct(c_in, hidden, 1, act="silu")
        self.cv2 = ConvBnAct(c_in, hidden, 1, act="silu")
        self.m = nn.Sequential(
            *(
                Residual(
                    nn.Sequential(
                        ConvBnAct(hidden, hidden, 1, act="silu"),
                        ConvBnAct(hidden, hidden, act="silu"),
                    )
                )
                for _ in range(depth)
            )
        )
        self.cv3 = ConvBnAct(2 * hidden, c_out, 1, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class C2f(nn.Module):
    """YOLOv8's block: 1x1, Split in two, a chain of bottlenecks, concat of every stage."""

    def __init__(self, c_in: int, c_out: int, depth: int = 1) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBnAct(c_in, 2 * self.hidden, 1, act="silu")
        self.m = nn.ModuleList(
            Residual(ConvBnAct(self.hidden, self.hidden, act="silu")) for _ in range(depth)
        )
        self.cv2 = ConvBnAct((2 + depth) * self.hidden, c_out, 1, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).split((self.hidden, self.hidden), dim=1))
        parts.extend(m(parts[-1]) for m in self.m)
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Three chained 5x5 max pools, concatenated: YOLOv5/v8's spatial pyramid pooling."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(c, c // 2, 1, act="silu")
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = ConvBnAct(c * 2, c, 1, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))


class CSPBackbone(nn.Module):
    """Stride 8/16/32 features, C3 or C2f blocks, SPPF at the top."""

    def __init__(self, block: type[nn.Module], widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        w8, w16, w32 = widths
        self.stem = nn.Sequential(
            ConvBnAct(3, 8, 3, 2, act="silu"), ConvBnAct(8, w8 // 2, 3, 2, act="silu")
        )
        self.s8 = nn.Sequential(ConvBnAct(w8 // 2, w8, 3, 2, act="silu"), block(w8, w8))
        self.s16 = nn.Sequential(ConvBnAct(w8, w16, 3, 2, act="silu"), block(w16, w16))
        self.s32 = nn.Sequential(ConvBnAct(w16, w32, 3, 2, act="silu"), block(w32, w32), SPPF(w32))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p8 = self.s8(self.stem(x))
        p16 = self.s16(p8)
        return [p8, p16, self.s32(p16)]


class PathAggregation(nn.Module):
    """YOLO's PAN neck: upsample + concat top-down, strided conv + concat bottom-up."""

    def __init__(self, block: type[nn.Module], widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        w8, w16, w32 = widths
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td16 = block(w32 + w16, w16)
        self.td8 = block(w16 + w8, w8)
        self.down8 = ConvBnAct(w8, w8, 3, 2, act="silu")
        self.bu16 = block(w8 + w16, w16)
        self.down16 = ConvBnAct(w16, w16, 3, 2, act="silu")
        self.bu32 = block(w16 + w32, w32)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p8, p16, p32 = feats
        t16 = self.td16(torch.cat((self.up(p32), p16), dim=1))
        t8 = self.td8(torch.cat((self.up(t16), p8), dim=1))
        b16 = self.bu16(torch.cat((self.down8(t8), t16), dim=1))
        b32 = self.bu32(torch.cat((self.down16(b16), p32), dim=1))
        return [t8, b16, b32]


class YoloV5(nn.Module):
    """Anchor-based: sigmoid everything, (2σ-0.5+grid)*stride, (2σ)²*anchor; (N, boxes, 5+C)."""

    strides = (8, 16, 32)
    anchors = (
        ((10, 13), (16, 30), (33, 23)),
        ((30, 61), (62, 45), (59, 119)),
        ((116, 90), (156, 198), (373, 326)),
    )

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CSPBackbone(C3)
        self.neck = PathAggregation(C3)
        self.no = 5 + NUM_CLASSES
        self.heads = nn.ModuleList(nn.Conv2d(c, 3 * self.no, 1) for c in (16, 32, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i, feature in enumerate(self.neck(self.backbone(x))):
            n, _, h, w = feature.shape
            y = self.heads[i](feature).view(n, 3, self.no, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((gx, gy), 2).view(1, 1, h, w, 2).float()
            anchor = torch.tensor(self.anchors[i], dtype=torch.float32).view(1, 3, 1, 1, 2)
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.strides[i]
            wh = (y[..., 2:4] * 2) ** 2 * anchor
            outputs.append(torch.cat((xy, wh, y[..., 4:]), -1).view(n, -1, self.no))
        return torch.cat(outputs, 1)


class DistributionFocalIntegral(nn.Module):
    """DFL: softmax over reg_max bins, then the expectation as a fixed 1x1 convolution."""

    def __init__(self, bins: int = 16) -> None:
        super().__init__()
        self.bins = bins
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, a = x.shape  # (N, 4*bins, anchors)
        return self.conv(x.view(n, 4, self.bins, a).transpose(2, 1).softmax(1)).view(n, 4, a)


class YoloV8(nn.Module):
    """Anchor-free with DFL, decoupled box/class branches; (N, 4+C, anchors) like Ultralytics."""

    strides = (8, 16, 32)

    def __init__(self, bins: int = 16) -> None:
        super().__init__()
        self.backbone = CSPBackbone(C2f)
        self.neck = PathAggregation(C2f)
        self.bins = bins
        self.box = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, 32, act="silu"), nn.Conv2d(32, 4 * bins, 1))
            for c in (16, 32, 64)
        )
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, 16, act="silu"), nn.Conv2d(16, NUM_CLASSES, 1))
            for c in (16, 32, 64)
        )
        self.dfl = DistributionFocalIntegral(bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.neck(self.backbone(x))
        n = x.shape[0]
        raw = torch.cat(
            [
                torch.cat((box(f), cls(f)), 1).view(n, 4 * self.bins + NUM_CLASSES, -1)
                for box, cls, f in zip(self.box, self.cls, feats, strict=True)
            ],
            2,
        )
        centres = torch.cat(
            [
                grid_centres(f.shape[2], f.shape[3], s) / s
                for f, s in zip(feats, self.strides, strict=True)
            ]
        ).T.unsqueeze(0)
        stride = torch.cat(
            [
                torch.full((f.shape[2] * f.shape[3],), float(s))
                for f, s in zip(feats, self.strides, strict=True)
            ]
        )
        distances, scores = raw.split((4 * self.bins, NUM_CLASSES), 1)
        lt, rb = self.dfl(distances).chunk(2, 1)
        xy = (centres + (rb - lt) / 2) * stride
        wh = (lt + rb) * stride
        return torch.cat((xy, wh, scores.sigmoid()), 1)


class YoloX(nn.Module):
    """Decoupled head (reg / obj / cls), exp for the size, grid offsets; (N, anchors, 5+C)."""

    strides = (8, 16, 32)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CSPBackbone(C3)
        self.neck = PathAggregation(C3)
        self.stems = nn.ModuleList(ConvBnAct(c, 16, 1, act="silu") for c in (16, 32, 64))
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(16, 16, act="silu"), nn.Conv2d(16, NUM_CLASSES, 1))
            for _ in range(3)
        )
        self.reg = nn.ModuleList(ConvBnAct(16, 16, act="silu") for _ in range(3))
        self.box = nn.ModuleList(nn.Conv2d(16, 4, 1) for _ in range(3))
        self.obj = nn.ModuleList(nn.Conv2d(16, 1, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i, f in enumerate(self.neck(self.backbone(x))):
            f = self.stems[i](f)
            r = self.reg[i](f)
            y = torch.cat((self.box[i](r), self.obj[i](r).sigmoid(), self.cls[i](f).sigmoid()), 1)
            h, w = y.shape[2:]
            y = y.flatten(2).permute(0, 2, 1)
            grid = grid_centres(h, w, 1) - 0.5
            xy = (y[..., :2] + grid) * self.strides[i]
            wh = torch.exp(y[..., 2:4]) * self.strides[i]
            outputs.append(torch.cat((xy, wh, y[..., 4:]), -1))
        return torch.cat(outputs, 1)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2: split (or stride 2 on both branches), depthwise, concat, channel shuffle."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = c_out // 2
        branch_in = c_in if stride == 2 else c_in // 2
        self.main = nn.Sequential(
            ConvBnAct(branch_in, half, 1),
            ConvBnAct(half, half, 3, stride, act="none", groups=half),
            ConvBnAct(half, half, 1),
        )
        self.short = (
            nn.Sequential(
                ConvBnAct(c_in, c_in, 3, 2, act="none", groups=c_in), ConvBnAct(c_in, half, 1)
            )
            if stride == 2
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            out = torch.cat((self.short(x), self.main(x)), 1)
        else:
            a, b = x.chunk(2, 1)
            out = torch.cat((a, self.main(b)), 1)
        return channel_shuffle(out)


class ShuffleBackbone(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96)) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBnAct(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        stages, c = [], 16
        for w in widths:
            stages.append(nn.Sequential(ShuffleUnit(c, w, 2), ShuffleUnit(w, w, 1)))
            c = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class NanoDetGFL(nn.Module):
    """NanoDet/PicoDet: ShuffleNet, a light PAN, shared depthwise GFL head with a DFL integral;
    outputs (N, anchors, C) scores and (N, anchors, 4) corner boxes."""

    strides = (8, 16, 32)

    def __init__(self, bins: int = 8) -> None:
        super().__init__()
        self.bins = bins
        self.backbone = ShuffleBackbone()
        self.fpn = FeaturePyramid([24, 48, 96], 32, act="leaky")
        self.head = nn.ModuleList(
            nn.Sequential(
                DepthwiseSeparable(32, 32, act="leaky", k=5),
                nn.Conv2d(32, NUM_CLASSES + 4 * bins, 1),
            )
            for _ in self.strides
        )
        self.project = torch.linspace(0, bins - 1, bins)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, boxes = [], []
        for head, f, s in zip(self.head, self.fpn(self.backbone(x)), self.strides, strict=True):
            y = head(f).flatten(2).permute(0, 2, 1)
            cls, reg = y.split((NUM_CLASSES, 4 * self.bins), -1)
            dist = reg.reshape(y.shape[0], -1, 4, self.bins).softmax(-1)
            dist = torch.matmul(dist, self.project.to(dist.dtype)) * s
            centres = grid_centres(f.shape[2], f.shape[3], s).to(dist.dtype)
            boxes.append(torch.cat((centres - dist[..., :2], centres + dist[..., 2:]), -1))
            scores.append(cls.sigmoid())
        return torch.cat(scores, 1), torch.cat(boxes, 1)


class FastestDet(nn.Module):
    """One stride-16 output map: objectness sigmoid, box tanh/sigmoid, class softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ShuffleBackbone()
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.fuse = ConvBnAct(24 + 48 + 96, 48, 1)
        self.head = DepthwiseSeparable(48, 48, k=5)
        self.obj = nn.Conv2d(48, 1, 1)
        self.reg = nn.Conv2d(48, 4, 1)
        self.cls = nn.Conv2d(48, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p8, p16, p32 = self.backbone(x)
        p8 = nn.functional.avg_pool2d(p8, 2)
        p32 = nn.functional.interpolate(p32, scale_factor=2.0, mode="nearest")
        y = self.head(self.fuse(self.pool(torch.cat((p8, p16, p32), 1))))
        reg = self.reg(y)
        out = torch.cat(
            (
                self.obj(y).sigmoid(),
                reg[:, :2].tanh(),
                reg[:, 2:].sigmoid(),
                self.cls(y).softmax(1),
            ),
            1,
        )
        return out.permute(0, 2, 3, 1)
