"""Convolutional backbones shared by support and query images.

Both return a feature map of `out_dim` channels (stride 2 for `small`, 4 for `large`), made by fusing a
coarse, dilated trunk (large receptive field, so a keypoint token sees the part it sits on) with
early high-resolution features (precise localisation). GroupNorm, not BatchNorm: episodes mix
categories with very different statistics, and the output of one image must not depend on the
other images of the batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


def conv_block(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        norm(out_ch),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm2 = norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))


class Backbone(nn.Module):
    """stem (stride 2) -> downsampling stages with residual blocks -> top-down fusion.

    stages: list of (channels, dilations of its residual blocks); every stage halves the resolution.
    out_level: 0 fuses down to the stem's stride 2, 1 to the first stage's stride 4, ...
    stem_blocks: residual blocks at stride 2. Keypoints on small objects are told apart by shape,
    not only colour, and shape needs capacity at high resolution: on the synthetic categories most
    matching errors confused two same-coloured glyphs until these blocks were added.
    """

    def __init__(self, stem_channels: int, stages: list[tuple[int, tuple[int, ...]]], out_dim: int,
                 out_level: int = 0, stem_blocks: int = 0):
        super().__init__()
        self.stem = nn.Sequential(
            conv_block(3, stem_channels, stride=2),
            conv_block(stem_channels, stem_channels),
            *[ResidualBlock(stem_channels) for _ in range(stem_blocks)],
        )
        self.stages = nn.ModuleList()
        in_ch = stem_channels
        for channels, dilations in stages:
            self.stages.append(nn.Sequential(
                conv_block(in_ch, channels, stride=2),
                *[ResidualBlock(channels, d) for d in dilations],
            ))
            in_ch = channels
        # lateral 1x1 projections of every level to out_dim, summed coarse-to-fine (FPN style)
        level_channels = [stem_channels] + [c for c, _ in stages]
        self.out_level = out_level
        self.laterals = nn.ModuleList(nn.Conv2d(c, out_dim, 1) for c in level_channels[out_level:])
        self.smooth = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), norm(out_dim), nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 1),
        )
        self.stride = 2 ** (out_level + 1)
        self.out_dim = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = [self.stem(images)]
        for stage in self.stages:
            levels.append(stage(levels[-1]))
        levels = levels[self.out_level:]
        fused = self.laterals[-1](levels[-1])
        for level, lateral in zip(reversed(levels[:-1]), reversed(self.laterals[:-1])):
            # nearest upsampling: its backward is deterministic on every device
            fused = lateral(level) + F.interpolate(fused, size=level.shape[-2:], mode="nearest")
        return self.smooth(fused)


def build_backbone(name: str, out_dim: int) -> Backbone:
    if name == "small":
        # 64 px input: 32x32 output, trunk at 16x16 with dilations 1-2-4 (receptive field ~ whole image)
        return Backbone(32, [(48, (1, 2, 4))], out_dim, stem_blocks=2)
    if name == "large":
        # 256 px input: 64x64 output; trunk down to stride 16 for context on real images
        return Backbone(32, [(64, (1, 1)), (128, (1, 2)), (256, (1, 2, 4, 1))], out_dim, out_level=1)
    raise ValueError(f"unknown backbone {name!r}; expected small or large")
