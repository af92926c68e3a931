"""U-Net (Ronneberger et al., MICCAI 2015): a contracting path of 3x3 convolutions and 2x2 max
pools, an expanding path of 2x2 up-convolutions, and skip connections that concatenate each
encoder level's features onto the decoder level of the same resolution.

Two departures from the paper, both usual today: padded convolutions (the output has the
input's size, so no overlap-tile cropping) and batch normalisation after each convolution.
Input normalisation is part of the module, so an exported graph takes [0, 1] RGB as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# ImageNet statistics: the usual choice, and any fixed affine map would do for a network
# trained from scratch; it only has to be the one the weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """``depth`` poolings, ``base`` channels at full resolution, doubled at each level.
    Height and width must be multiples of ``2 ** depth`` (:attr:`size_multiple`). Takes float
    RGB in [0, 1], (N, 3, H, W); returns (N, ``out_channels``, H, W) logits."""

    def __init__(
        self,
        out_channels: int,
        *,
        base: int = 16,
        depth: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if out_channels < 1 or base < 1 or depth < 1:
            raise ValueError(
                f"out_channels, base and depth must be >= 1, got {out_channels}, {base}, {depth}"
            )
        self.depth = depth
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        widths = [base * 2**level for level in range(depth + 1)]
        self.encoder = nn.ModuleList(
            _double_conv(c_in, c_out)
            for c_in, c_out in zip([3, *widths[:-2]], widths[:-1], strict=True)
        )
        self.bottleneck = _double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            for level in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _double_conv(2 * widths[level], widths[level]) for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    @property
    def size_multiple(self) -> int:
        return 2**self.depth

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.head(x)
