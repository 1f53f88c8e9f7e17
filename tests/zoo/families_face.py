"""Face and text detectors: RetinaFace and SCRFD (boxes + five landmarks), CenterFace (heatmap,
max-pool peaks, TopK), BlazeFace (NHWC input, 5x5 depthwise, channel padding), UltraFace
(non-square input, priors decoded in the graph) and a DB text detector (segmentation map,
ConvTranspose and bilinear upsampling, differentiable binarization)."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo.blocks import (
    ConvBnAct,
    DepthwiseSeparable,
    FeaturePyramid,
    decode_with_priors,
    flatten_head,
    grid_centres,
    priors,
)


class MobileNetV1(nn.Module):
    """RetinaFace/SCRFD/UltraFace backbone: depthwise-separable stages, LeakyReLU or ReLU."""

    def __init__(self, act: str = "leaky", widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        w8, w16, w32 = widths
        self.s8 = nn.Sequential(
            ConvBnAct(3, 8, 3, 2, act=act),
            DepthwiseSeparable(8, 16, 2, act=act),
            DepthwiseSeparable(16, w8, 2, act=act),
        )
        self.s16 = DepthwiseSeparable(w8, w16, 2, act=act)
        self.s32 = DepthwiseSeparable(w16, w32, 2, act=act)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p8 = self.s8(x)
        p16 = self.s16(p8)
        return [p8, p16, self.s32(p16)]


class SSH(nn.Module):
    """RetinaFace's context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches, concat."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.b3 = ConvBnAct(c, c // 2, act="none")
        self.b5a = ConvBnAct(c, c // 4, act="leaky")
        self.b5 = ConvBnAct(c // 4, c // 4, act="none")
        self.b7a = ConvBnAct(c // 4, c // 4, act="leaky")
        self.b7 = ConvBnAct(c // 4, c // 4, act="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.b5a(x)
        return torch.relu(torch.cat((self.b3(x), self.b5(a), self.b7(self.b7a(a))), 1))


class RetinaFace(nn.Module):
    """Boxes, 2-way softmax scores and five landmarks per anchor, decoded against priors."""

    prior: torch.Tensor

    strides = (8, 16, 32)

    def __init__(self, image_size: int = 160) -> None:
        super().__init__()
        self.backbone = MobileNetV1()
        self.fpn = FeaturePyramid([16, 32, 64], 32, act="leaky")
        self.ssh = nn.ModuleList(SSH(32) for _ in self.strides)
        self.cls = nn.ModuleList(nn.Conv2d(32, 2 * 2, 1) for _ in self.strides)
        self.box = nn.ModuleList(nn.Conv2d(32, 2 * 4, 1) for _ in self.strides)
        self.landmarks = nn.ModuleList(nn.Conv2d(32, 2 * 10, 1) for _ in self.strides)
        self.register_buffer(
            "prior",
            torch.cat(
                [
                    priors(image_size // s, image_size // s, s, [2.0 * s, 4.0 * s])
                    for s in self.strides
                ]
            ),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = [ssh(f) for ssh, f in zip(self.ssh, self.fpn(self.backbone(x)), strict=True)]
        scores = torch.cat([flatten_head(c(f), 2) for c, f in zip(self.cls, feats, strict=True)], 1)
        deltas = torch.cat([flatten_head(b(f), 4) for b, f in zip(self.box, feats, strict=True)], 1)
        marks = torch.cat(
            [flatten_head(m(f), 10) for m, f in zip(self.landmarks, feats, strict=True)], 1
        )
        marks = marks.reshape(marks.shape[0], -1, 5, 2)
        prior = self.prior[:, None, :]
        points = prior[..., :2] + marks * 0.1 * prior[..., 2:]
        boxes = decode_with_priors(deltas, self.prior)
        return boxes, scores.softmax(-1)[..., 1:], points.flatten(2)


class SCRFD(nn.Module):
    """Anchor-free face detector: shared GroupNorm head, distance-to-box and distance-to-point
    decoding around each cell centre (two anchors per cell, as SCRFD's 500m-2.5g models)."""

    strides = (8, 16, 32)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV1(act="relu")
        self.fpn = FeaturePyramid([16, 32, 64], 24)
        self.tower = nn.Sequential(
            DepthwiseSeparable(24, 24), nn.Conv2d(24, 24, 3, 1, 1), nn.GroupNorm(4, 24), nn.ReLU()
        )
        self.score = nn.Conv2d(24, 2, 3, 1, 1)
        self.bbox = nn.Conv2d(24, 2 * 4, 3, 1, 1)
        self.kps = nn.Conv2d(24, 2 * 10, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, boxes, points = [], [], []
        for f, s in zip(self.fpn(self.backbone(x)), self.strides, strict=True):
            t = self.tower(f)
            centres = grid_centres(f.shape[2], f.shape[3], s).repeat_interleave(2, 0) - s / 2
            dist = flatten_head(self.bbox(t), 4) * s
            boxes.append(torch.cat((centres - dist[..., :2], centres + dist[..., 2:]), -1))
            kps = flatten_head(self.kps(t), 10) * s
            points.append((kps.reshape(kps.shape[0], -1, 5, 2) + centres[:, None, :]).flatten(2))
            scores.append(flatten_head(self.score(t), 1).sigmoid())
        return torch.cat(scores, 1), torch.cat(boxes, 1), torch.cat(points, 1)


class CenterFace(nn.Module):
    """CenterNet-style: ConvTranspose upsampling to stride 4, heatmap/scale/offset/landmark maps;
    peaks where the heatmap equals its 3x3 max pool, the best K taken with TopK."""

    def __init__(self, top_k: int = 20) -> None:
        super().__init__()
        self.top_k = top_k
        self.backbone = MobileNetV1(act="relu")
        self.up = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 24, 4, 2, 1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(),
        )
        self.lateral = ConvBnAct(16, 24, 1)
        self.up4 = nn.ConvTranspose2d(24, 24, 2, 2)
        self.heatmap = nn.Conv2d(24, 1, 1)
        self.scale = nn.Conv2d(24, 2, 1)
        self.offset = nn.Conv2d(24, 2, 1)
        self.landmarks = nn.Conv2d(24, 10, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p8, _, p32 = self.backbone(x)
        f = self.up4(self.up(p32) + self.lateral(p8))
        heat = self.heatmap(f).sigmoid()
        peaks = heat * (heat == nn.functional.max_pool2d(heat, 3, 1, 1)).float()
        score, index = peaks.flatten(1).topk(self.top_k, dim=1)
        maps = torch.cat((self.scale(f), self.offset(f), self.landmarks(f)), 1).flatten(2)
        picked = torch.gather(maps, 2, index.unsqueeze(1).expand(-1, maps.shape[1], -1))
        width = f.shape[3]
        xy = torch.stack(
            ((index % width).float(), torch.div(index, width, rounding_mode="floor").float()), -1
        )
        return score, xy, picked.transpose(1, 2)


class BlazeBlock(nn.Module):
    """5x5 depthwise + 1x1; stride 2 goes through a 2x2 max pool on the shortcut and channel
    growth through zero padding of the shortcut (F.pad on the channel axis)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.pad = c_out - c_in
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_in, 5, stride, 2, groups=c_in), nn.Conv2d(c_in, c_out, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = nn.functional.max_pool2d(x, 2, 2) if self.stride == 2 else x
        if self.pad:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return torch.relu(self.body(x) + shortcut)


class BlazeFace(nn.Module):
    """MediaPipe's front-camera model at 128 px, fed NHWC as TFLite conversions are."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 5, 2, 2), nn.ReLU())
        self.s16 = nn.Sequential(
            BlazeBlock(16, 16), BlazeBlock(16, 24, 2), BlazeBlock(24, 24), BlazeBlock(24, 32, 2)
        )
        self.s8 = nn.Sequential(BlazeBlock(32, 48, 2), BlazeBlock(48, 48))
        self.s8_cls = nn.Conv2d(32, 2, 1)
        self.s8_reg = nn.Conv2d(32, 2 * 16, 1)
        self.s16_cls = nn.Conv2d(48, 6, 1)
        self.s16_reg = nn.Conv2d(48, 6 * 16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.permute(0, 3, 1, 2)
        a = self.s16(self.stem(x))
        b = self.s8(a)
        scores = torch.cat((flatten_head(self.s8_cls(a), 1), flatten_head(self.s16_cls(b), 1)), 1)
        boxes = torch.cat((flatten_head(self.s8_reg(a), 16), flatten_head(self.s16_reg(b), 16)), 1)
        return scores.sigmoid(), boxes


class UltraFace(nn.Module):
    """Version-RFB-like light face detector on a 160x120 (W x H) frame: softmax scores and
    boxes decoded against priors inside the graph."""

    prior: torch.Tensor

    strides = (8, 16, 32)

    def __init__(self, height: int = 120, width: int = 160) -> None:
        super().__init__()
        self.backbone = MobileNetV1(act="relu", widths=(16, 24, 32))
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, c, 3, groups=c), nn.Conv2d(c, 2 * 2, 1))
            for c in (16, 24, 32)
        )
        self.box = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, c, 3, groups=c), nn.Conv2d(c, 2 * 4, 1))
            for c in (16, 24, 32)
        )
        cells = []
        for s in self.strides:
            h, w = -(-height // s), -(-width // s)  # ceil: stride-2 convolutions pad
            cells.append(_rect_priors(h, w, s, [1.5 * s, 3.0 * s]))
        self.register_buffer("prior", torch.cat(cells))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        scores = torch.cat([flatten_head(c(f), 2) for c, f in zip(self.cls, feats, strict=True)], 1)
        deltas = torch.cat([flatten_head(b(f), 4) for b, f in zip(self.box, feats, strict=True)], 1)
        return scores.softmax(-1), decode_with_priors(deltas, self.prior)


def _rect_priors(height: int, width: int, stride: int, sizes: list[float]) -> torch.Tensor:
    if height == width:
        return priors(height, width, stride, sizes)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = (torch.stack((xs, ys), -1).reshape(-1, 1, 2).float() + 0.5) * stride
    wh = torch.tensor(sizes).repeat_interleave(2).reshape(1, -1, 2)
    return torch.cat(
        (centres.expand(-1, len(sizes), 2), wh.expand(centres.shape[0], -1, 2)), -1
    ).reshape(-1, 4)


class DBText(nn.Module):
    """DBNet-like text detector: FPN features resized bilinearly (Resize with sizes) to stride 8
    and concatenated, probability and threshold maps through ConvTranspose to stride 2 and a
    bilinear upsampling to full resolution,
    approximate binary map 1 / (1 + exp(-k (P - T)))."""

    def __init__(self, k: float = 50.0) -> None:
        super().__init__()
        self.k = k
        self.backbone = MobileNetV1(act="relu")
        self.fpn = FeaturePyramid([16, 32, 64], 16)
        self.fuse = ConvBnAct(48, 16, 3)
        self.prob = self._head()
        self.thresh = self._head()

    @staticmethod
    def _head() -> nn.Module:
        return nn.Sequential(
            nn.ConvTranspose2d(16, 8, 2, 2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.ConvTranspose2d(8, 1, 2, 2),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p8, p16, p32 = self.fpn(self.backbone(x))
        size = (p8.shape[2], p8.shape[3])
        fused = torch.cat(
            [
                nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False)
                for f in (p8, p16, p32)
            ],
            1,
        )
        fused = self.fuse(fused)
        prob, thresh = self.prob(fused), self.thresh(fused)
        prob = nn.functional.interpolate(prob, scale_factor=2.0, mode="bilinear")
        thresh = nn.functional.interpolate(thresh, scale_factor=2.0, mode="bilinear")
        return prob, torch.reciprocal(1 + torch.exp(-self.k * (prob - thresh)))
