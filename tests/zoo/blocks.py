"""Building blocks the zoo's detectors share, and the record that describes one zoo entry.

Every block is plain torch (torchvision cannot be imported beside the pinned CPU torch), small,
and spelled the way the families' reference code spells it, so the exported graphs carry the
same operator idioms: BatchNorm after every convolution, depthwise convolutions, SiLU, HardSwish,
ReLU6 and LeakyReLU, nearest upsampling through ``interpolate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "hswish": lambda: nn.Hardswish(inplace=True),
    "leaky": lambda: nn.LeakyReLU(0.1, inplace=True),
    "none": nn.Identity,
}


@dataclass(frozen=True)
class Family:
    """One detector architecture of the zoo: how to build it and what it eats."""

    name: str
    build: Callable[[], nn.Module]
    #: the shape the model is exported with (batch included); NHWC families say so in layout
    input_shape: tuple[int, int, int, int]
    layout: str = "NCHW"
    #: the family's distinctive operators, for the report
    idioms: str = ""


class ConvBnAct(nn.Sequential):
    def __init__(
        self, c_in: int, c_out: int, k: int = 3, s: int = 1, act: str = "relu", groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            ACTIVATIONS[act](),
        )


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, s: int = 1, act: str = "relu", k: int = 3) -> None:
        super().__init__(
            ConvBnAct(c_in, c_in, k, s, act, groups=c_in), ConvBnAct(c_in, c_out, 1, 1, act)
        )


class Residual(nn.Module):
    """x + block(x): ResNet's and YOLO's bottleneck shortcut."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class FeaturePyramid(nn.Module):
    """A top-down FPN: lateral 1x1 convolutions, nearest upsampling, add, 3x3 smoothing."""

    def __init__(self, in_channels: list[int], width: int, act: str = "relu") -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBnAct(c, width, 1, act=act) for c in in_channels)
        self.smooth = nn.ModuleList(ConvBnAct(width, width, 3, act=act) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + nn.functional.interpolate(
                laterals[i], scale_factor=2.0, mode="nearest"
            )
        return [conv(f) for conv, f in zip(self.smooth, laterals, strict=True)]


def grid_centres(height: int, width: int, stride: int) -> torch.Tensor:
    """(H*W, 2) cell centres in pixels, x first: what anchor-free heads add their offsets to."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (torch.stack((xs, ys), dim=-1).reshape(-1, 2).float() + 0.5) * stride


def priors(height: int, width: int, stride: int, sizes: list[float]) -> torch.Tensor:
    """(H*W*len(sizes), 4) square priors as (cx, cy, w, h): SSD's and RetinaFace's anchors."""
    centres = grid_centres(height, width, stride)
    wh = torch.tensor(sizes, dtype=torch.float32).repeat_interleave(2).reshape(-1, 2)
    centres = centres[:, None, :].expand(-1, len(sizes), 2)
    wh = wh[None, :, :].expand(centres.shape[0], -1, 2)
    return torch.cat((centres, wh), dim=-1).reshape(-1, 4)


def decode_with_priors(deltas: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """SSD's box coding (variances 0.1, 0.2) to corner boxes."""
    centre = prior[..., :2] + deltas[..., :2] * 0.1 * prior[..., 2:]
    size = prior[..., 2:] * torch.exp(deltas[..., 2:] * 0.2)
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def flatten_head(x: torch.Tensor, per_cell: int) -> torch.Tensor:
    """(N, A*K, H, W) → (N, H*W*A, K): the Permute + Reshape every dense head ends with."""
    n = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(n, -1, per_cell)


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics far from (0, 1), so a wrong BatchNorm fold shows in verification."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.weight.data.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)
    return model.eval()
