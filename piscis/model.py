"""The spot network: a small full-resolution U-Net with a spot map and a
displacement field (DESIGN.md section 2).

The first level works at full resolution (no strided stem) because spots
are 2-3 px across. Every level has two 3x3 convolutions with batch
normalisation; the decoder concatenates the skip connection. For inference
:func:`fuse_batchnorm` folds the normalisation into the convolutions.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SpotNet(nn.Module):
    """Encoder-decoder returning (logit, dy, dx) maps of the input's size.

    Parameters
    ----------
    channels : feature channels per level, full resolution first. The input
        height and width must be multiples of ``2 ** (len(channels) - 1)``.
    in_channels : number of image channels (1 for a grey image).
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 1):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.in_channels = int(in_channels)
        self.encoders = nn.ModuleList()
        c_prev = in_channels
        for c in self.channels:
            self.encoders.append(_block(c_prev, c))
            c_prev = c
        self.decoders = nn.ModuleList(
            _block(self.channels[i + 1] + self.channels[i], self.channels[i])
            for i in reversed(range(len(self.channels) - 1))
        )
        self.head = nn.Conv2d(self.channels[0], 3, 1)
        # Spots are rare: start with a low spot probability and no displacement.
        with torch.no_grad():
            self.head.weight[1:].zero_()
            self.head.bias.copy_(torch.tensor([-4.0, 0.0, 0.0]))

    @property
    def multiple(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.encoders):
            if i:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for dec in self.decoders:
            skip = skips.pop()
            if isinstance(dec[0], SplitConv):  # fused for inference: upsamples itself
                x = dec[1:](dec[0](x, skip))
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)


class SplitConv(nn.Module):
    """The first convolution of a decoder block, for inference:
    ``conv(cat(upsample(a), b))`` without the upsampled copy nor the concatenation.

    The convolution splits into a part over the skip connection ``b`` and a part over
    the nearest-upsampled ``a``. The latter is a 3x3 convolution of ``a`` at its own
    resolution with one output per phase of the 2x2 upsampling (each phase sums the
    taps of the full kernel that fall on the same low-resolution pixel), put back in
    place by a pixel shuffle. Same result up to float rounding; on a CPU it is about
    twice as fast as upsampling, convolving and adding at full resolution.
    """

    def __init__(self, conv: nn.Conv2d, n_a: int):
        super().__init__()
        c_out = conv.out_channels
        self.conv_up = nn.Conv2d(n_a, 4 * c_out, 3, padding=1)
        self.conv_b = nn.Conv2d(conv.in_channels - n_a, c_out, 3, padding=1, bias=False)
        w = conv.weight[:, :n_a]
        phases = torch.zeros(c_out, 4, n_a, 3, 3, dtype=w.dtype)
        # Output pixel 2i + py with tap ky reads a[i + (py + ky - 1) // 2].
        for py in range(2):
            for px in range(2):
                for ky in range(3):
                    for kx in range(3):
                        ly, lx = (py + ky - 1) // 2 + 1, (px + kx - 1) // 2 + 1
                        phases[:, py * 2 + px, :, ly, lx] += w[:, :, ky, kx]
        with torch.no_grad():
            self.conv_up.weight.copy_(phases.reshape(4 * c_out, n_a, 3, 3))
            self.conv_up.bias.copy_(conv.bias.repeat_interleave(4))
            self.conv_b.weight.copy_(conv.weight[:, n_a:])

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.conv_b(b)
        out += F.pixel_shuffle(self.conv_up(a), 2)
        return out


def receptive_margin(channels: tuple[int, ...]) -> int:
    """Pixels of context on each side that change a pixel's output.

    Two 3x3 convolutions per block, at level k each adds ``2 ** k`` px per
    side; pooling and upsampling add up to ``2 ** k`` more. The bound is
    rounded up to a multiple of the network's size multiple.
    """
    depth = len(channels)
    margin = 0
    for k in range(depth):
        margin += 2 * 2**k  # encoder block
        if k:
            margin += 2**k  # pooling / upsampling misalignment
            margin += 2 * 2 ** (k - 1)  # decoder block of the level above
    multiple = 2 ** (depth - 1)
    return int(-(-margin // multiple) * multiple)


@torch.no_grad()
def fuse_batchnorm(model: SpotNet) -> SpotNet:
    """Fold every BatchNorm into the convolution before it (inference only)."""
    for seq in list(model.encoders) + list(model.decoders):
        layers = list(seq)
        fused = []
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                std = torch.sqrt(nxt.running_var + nxt.eps)
                conv = nn.Conv2d(
                    layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding
                )
                conv.weight.copy_(layer.weight * (nxt.weight / std).reshape(-1, 1, 1, 1))
                bias = layer.bias if layer.bias is not None else torch.zeros_like(nxt.running_mean)
                conv.bias.copy_((bias - nxt.running_mean) * nxt.weight / std + nxt.bias)
                fused.append(conv)
                i += 2
            else:
                fused.append(layer)
                i += 1
        seq._modules.clear()
        for j, layer in enumerate(fused):
            seq.add_module(str(j), layer)
    # The first convolution of each decoder block takes (upsampled, skip).
    for k, dec in enumerate(model.decoders):
        n_up = model.channels[len(model.channels) - 1 - k]
        if isinstance(dec[0], nn.Conv2d):
            dec._modules["0"] = SplitConv(dec[0], n_up)
    return model.eval()
