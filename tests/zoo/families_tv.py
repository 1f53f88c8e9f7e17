"""torchvision-style detectors, rewritten in plain torch: SSDlite on a MobileNetV3, RetinaNet,
FCOS, a two-stage Faster R-CNN-like model (RPN → TopK proposals → Gather → box head) and a
DETR-style transformer. Each has the family's head and, where torchvision has one, its in-graph
box decoding; ``postprocess=False`` exports the raw head outputs instead."""

from __future__ import annotations

import math

import torch
from torch import nn

from tests.zoo.blocks import (
    ConvBnAct,
    FeaturePyramid,
    decode_with_priors,
    flatten_head,
    grid_centres,
    priors,
)

NUM_CLASSES = 4


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: global average pool, two 1x1 convolutions, Hardsigmoid gate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c, max(8, c // 4), 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(max(8, c // 4), c, 1),
            nn.Hardsigmoid(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, stride: int, act: str, se: bool):
        super().__init__()
        hidden = c_in * expand
        self.block = nn.Sequential(
            ConvBnAct(c_in, hidden, 1, act=act),
            ConvBnAct(hidden, hidden, 3, stride, act=act, groups=hidden),
            SqueezeExcite(hidden) if se else nn.Identity(),
            ConvBnAct(hidden, c_out, 1, act="none"),
        )
        self.shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.shortcut else y


class MobileNetV3(nn.Module):
    """Stride 8/16/32 features of a MobileNetV3-small-like stack (ReLU early, Hardswish late)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnAct(3, 16, 3, 2, act="hswish")
        self.s4 = InvertedResidual(16, 16, 1, 2, "relu", se=True)
        self.s8 = InvertedResidual(16, 24, 3, 2, "relu", se=False)
        self.s16 = nn.Sequential(
            InvertedResidual(24, 40, 3, 2, "hswish", se=True),
            InvertedResidual(40, 40, 3, 1, "hswish", se=True),
        )
        self.s32 = InvertedResidual(40, 48, 3, 2, "hswish", se=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p8 = self.s8(self.s4(self.stem(x)))
        p16 = self.s16(p8)
        return [p8, p16, self.s32(p16)]


class SSDLite(nn.Module):
    """SSDlite320-like: depthwise-separable class/box heads on each scale plus extra layers;
    with ``postprocess`` the priors decode and softmax run in the graph."""

    prior: torch.Tensor

    sizes = ((16.0, 24.0), (32.0, 48.0), (64.0, 96.0), (112.0, 128.0))

    def __init__(self, postprocess: bool, image_size: int = 128) -> None:
        super().__init__()
        self.postprocess = postprocess
        self.backbone = MobileNetV3()
        self.extra = ConvBnAct(48, 32, 3, 2, act="relu6")
        channels = (24, 40, 48, 32)
        self.cls = nn.ModuleList(self._head(c, 2 * (NUM_CLASSES + 1)) for c in channels)
        self.box = nn.ModuleList(self._head(c, 2 * 4) for c in channels)
        strides = (8, 16, 32, 64)
        self.register_buffer(
            "prior",
            torch.cat(
                [
                    priors(image_size // s, image_size // s, s, list(sz))
                    for s, sz in zip(strides, self.sizes, strict=True)
                ]
            ),
        )

    @staticmethod
    def _head(c: int, out: int) -> nn.Module:
        return nn.Sequential(ConvBnAct(c, c, 3, act="relu6", groups=c), nn.Conv2d(c, out, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        feats.append(self.extra(feats[-1]))
        logits = torch.cat(
            [flatten_head(h(f), NUM_CLASSES + 1) for h, f in zip(self.cls, feats, strict=True)], 1
        )
        deltas = torch.cat([flatten_head(h(f), 4) for h, f in zip(self.box, feats, strict=True)], 1)
        if not self.postprocess:
            return logits, deltas
        return decode_with_priors(deltas, self.prior), logits.softmax(-1)[..., 1:]


class ResNetLite(nn.Module):
    """A few ResNet basic blocks: stride 8/16/32 features for the FPN detectors."""

    def __init__(self, widths: tuple[int, int, int] = (24, 32, 48)) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBnAct(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1))
        stages, c = [], 16
        for w in widths:
            stages.append(_BasicBlock(c, w))
            c = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBnAct(c_in, c_out, 3, 2), ConvBnAct(c_out, c_out, act="none"))
        self.down = ConvBnAct(c_in, c_out, 1, 2, act="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.down(x))


class RetinaNet(nn.Module):
    """FPN with a P6 level, class and box subnets shared across levels, sigmoid class scores."""

    prior: torch.Tensor

    def __init__(self, postprocess: bool, image_size: int = 128) -> None:
        super().__init__()
        self.postprocess = postprocess
        self.backbone = ResNetLite()
        self.fpn = FeaturePyramid([24, 32, 48], 32)
        self.p6 = nn.Conv2d(32, 32, 3, 2, 1)
        self.anchors = 3
        logits = nn.Conv2d(32, 3 * NUM_CLASSES, 3, 1, 1)
        assert logits.bias is not None
        nn.init.constant_(logits.bias, -math.log(99.0))  # RetinaNet's prior p = 0.01
        self.cls = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), logits)
        self.box = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 12, 3, 1, 1))
        strides = (8, 16, 32, 64)
        self.register_buffer(
            "prior",
            torch.cat(
                [
                    priors(image_size // s, image_size // s, s, [4.0 * s, 5.0 * s, 6.4 * s])
                    for s in strides
                ]
            ),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.fpn(self.backbone(x))
        feats.append(self.p6(torch.relu(feats[-1])))
        logits = torch.cat([flatten_head(self.cls(f), NUM_CLASSES) for f in feats], 1)
        deltas = torch.cat([flatten_head(self.box(f), 4) for f in feats], 1)
        if not self.postprocess:
            return logits, deltas
        return decode_with_priors(deltas, self.prior), torch.sigmoid(logits)


class Scale(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value))  # a 0-d parameter, as FCOS has

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class FCOS(nn.Module):
    """Anchor-free: per-level learned Scale, exp(ltrb) distances, centerness multiplied in."""

    strides = (8, 16, 32)

    def __init__(self, postprocess: bool) -> None:
        super().__init__()
        self.postprocess = postprocess
        self.backbone = ResNetLite()
        self.fpn = FeaturePyramid([24, 32, 48], 32)
        self.tower = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.GroupNorm(8, 32), nn.ReLU())
        self.cls = nn.Conv2d(32, NUM_CLASSES, 3, 1, 1)
        self.ltrb = nn.Conv2d(32, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(32, 1, 3, 1, 1)
        self.scales = nn.ModuleList(Scale(1.0 + 0.1 * i) for i in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = [], []
        for f, s, scale in zip(self.fpn(self.backbone(x)), self.strides, self.scales, strict=True):
            t = self.tower(f)
            ltrb = torch.exp(scale(self.ltrb(t))) * s
            quality = torch.sigmoid(self.cls(t)) * torch.sigmoid(self.centerness(t))
            ltrb, quality = flatten_head(ltrb, 4), flatten_head(quality, NUM_CLASSES)
            if self.postprocess:
                centres = grid_centres(f.shape[2], f.shape[3], s)
                ltrb = torch.cat((centres - ltrb[..., :2], centres + ltrb[..., 2:]), -1)
            boxes.append(ltrb)
            scores.append(torch.sqrt(quality))
        return torch.cat(boxes, 1), torch.cat(scores, 1)


class TwoStage(nn.Module):
    """Faster R-CNN-like: an RPN scores anchors, TopK keeps the best proposals, their features
    are gathered at the proposal cells (the RoI step, NMS-free) and a box head refines them."""

    prior: torch.Tensor

    def __init__(self, proposals: int = 32, image_size: int = 128) -> None:
        super().__init__()
        self.proposals = proposals
        self.backbone = ResNetLite()
        self.fpn = FeaturePyramid([24, 32, 48], 32)
        self.rpn = nn.Conv2d(32, 32, 3, 1, 1)
        self.objectness = nn.Conv2d(32, 3, 1)
        self.rpn_box = nn.Conv2d(32, 12, 1)
        self.box_head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.cls = nn.Linear(64, NUM_CLASSES + 1)
        self.refine = nn.Linear(64, 4)
        self.register_buffer("prior", priors(image_size // 16, image_size // 16, 16, [32, 48, 64]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feature = self.fpn(self.backbone(x))[1]  # stride 16
        hidden = torch.relu(self.rpn(feature))
        objectness = flatten_head(self.objectness(hidden), 1).squeeze(-1)
        anchors = decode_with_priors(flatten_head(self.rpn_box(hidden), 4), self.prior)
        score, index = objectness.sigmoid().topk(self.proposals, dim=1)
        boxes = torch.gather(anchors, 1, index.unsqueeze(-1).expand(-1, -1, 4))
        cells = torch.div(index, 3, rounding_mode="floor")  # three anchors per cell
        pooled = feature.flatten(2).transpose(1, 2)
        pooled = torch.gather(pooled, 1, cells.unsqueeze(-1).expand(-1, -1, pooled.shape[-1]))
        h = self.box_head(pooled)
        proposals = torch.cat(
            ((boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]), -1
        )
        refined = decode_with_priors(self.refine(h), proposals)
        return refined, self.cls(h).softmax(-1), score


class SelfAttention(nn.Module):
    """Multi-head attention spelled in MatMul / Softmax, as DETR exports do after tracing."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        n, lq, d = query.shape
        hd = d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(query)), split(self.k(key)), split(self.v(value))
        attn = torch.matmul(q, k.transpose(-2, -1)) * (hd**-0.5)
        y = torch.matmul(attn.softmax(-1), v).transpose(1, 2).reshape(n, lq, d)
        return self.out(y)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x + pos, x + pos, x))
        return self.norm2(x + self.ffn(x))


class _DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.cross_attn = SelfAttention(dim, heads)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt))
        tgt = self.norms[1](tgt + self.cross_attn(tgt + query_pos, memory + pos, memory))
        return self.norms[2](tgt + self.ffn(tgt))


class DETR(nn.Module):
    """Conv backbone, sine positional encoding, encoder-decoder with learned object queries;
    (N, queries, C+1) class probabilities and (N, queries, 4) sigmoid boxes."""

    def __init__(self, dim: int = 32, queries: int = 16, image_size: int = 128) -> None:
        super().__init__()
        self.backbone = ResNetLite()
        self.proj = nn.Conv2d(48, dim, 1)
        self.encoder = nn.ModuleList(_EncoderLayer(dim, 4) for _ in range(2))
        self.decoder = nn.ModuleList(_DecoderLayer(dim, 4) for _ in range(2))
        self.query_embed = nn.Parameter(torch.randn(queries, dim))
        self.cls = nn.Linear(dim, NUM_CLASSES + 1)
        self.box = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
        side = image_size // 32
        self.register_buffer("pos", _sine_positions(side, side, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.proj(self.backbone(x)[-1]).flatten(2).transpose(1, 2)
        for layer in self.encoder:
            memory = layer(memory, self.pos)
        query_pos = self.query_embed.unsqueeze(0).expand(x.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        for layer in self.decoder:
            tgt = layer(tgt, memory, self.pos, query_pos)
        return self.cls(tgt).softmax(-1), self.box(tgt).sigmoid()


def _sine_positions(height: int, width: int, dim: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(1, height + 1, dtype=torch.float32),
        torch.arange(1, width + 1, dtype=torch.float32),
        indexing="ij",
    )
    freqs = 10000 ** (2 * (torch.arange(dim // 4, dtype=torch.float32)) / (dim // 2))
    parts: list[torch.Tensor] = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] / freqs
        parts.extend((angles.sin(), angles.cos()))
    return torch.cat(parts, 1).unsqueeze(0)
