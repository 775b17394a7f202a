"""3x3 convolutions with 4x fewer multiplications: Winograd's F(4x4, 3x3), in plain torch ops.

On these CPUs the exact path's OpenVINO graph already runs its direct convolutions near the fp32
peak, so the only way left to make it faster is less arithmetic. Winograd's minimal filtering
algorithm computes each 4x4 output tile of a 3x3 convolution from a 6x6 input tile with 36
multiplications per (input, output) channel pair instead of 144:

    Y = A^T [ (G g G^T) * (B^T d B) ] A      (Lavin & Gray, "Fast Algorithms for Convolutional
                                              Neural Networks", 2015; interpolation points 0, +-1,
                                              +-2)

The module below is written so that the OpenVINO conversion turns it into a handful of fast
kernels: the input transform is one strided 6x6 convolution over every channel (channels moved to
the batch axis), the products are one batched matrix product (36 GEMMs of C_out x C_in by C_in x
tiles), the output transform one small matrix product followed by a reshuffle. The filter
transform ``G g G^T`` is done once, in float64, when the module is built.

It is exact up to float rounding: the error is about ten times that of a direct fp32 convolution
(about 1e-5 relative); the detect-mode tests check that the detections stay equal to
eager torchvision's.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

# F(4x4, 3x3) transform matrices (interpolation points 0, 1, -1, 2, -2 and infinity).
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE = 4  # output tile side; input tiles are TILE + 2


def is_winograd_compatible(conv: torch.nn.Module) -> bool:
    """A plain 3x3, stride 1, padding 1, undilated, ungrouped convolution."""
    return (
        isinstance(conv, torch.nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, norm: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by an eval-mode batch norm (torch's or torchvision's frozen
    one), as one convolution."""
    scale = norm.weight.double() * (norm.running_var.double() + norm.eps).rsqrt()
    shift = norm.bias.double() - norm.running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double() * scale
    return weight.double() * scale.view(-1, 1, 1, 1), shift


class WinogradConv3x3(torch.nn.Module):
    """Same result as ``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel, batch size 1."""

    # buffers (registered in __init__, so that they follow the module's device and dtype)
    filters: torch.Tensor
    input_transform: torch.Tensor
    output_transform: torch.Tensor
    bias: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        whole_tiles: bool = False,
        strips: int = 1,
    ):
        """``whole_tiles``: the caller guarantees height and width are multiples of 4 (as on the
        FPN's P2 and P3 levels of an image padded to 32), so no padding or cropping is needed.
        ``strips`` (with ``whole_tiles``): compute the output in that many horizontal strips, one
        after the other, so that the large intermediate tensors are that many times smaller; the
        caller guarantees at least that many rows of tiles (height >= 4 * strips)."""
        super().__init__()
        self.whole_tiles = whole_tiles
        self.strips = strips
        weight = weight.detach().double()
        out_channels, in_channels, kh, kw = weight.shape
        if (kh, kw) != (3, 3):
            raise ValueError(f"a 3x3 kernel is needed, not {kh}x{kw}")
        bt = torch.tensor(_BT, dtype=torch.float64)
        g = torch.tensor(_G, dtype=torch.float64)
        at = torch.tensor(_AT, dtype=torch.float64)
        side = TILE + 2
        # (36, C_out, C_in): the filter in the transformed domain, one matrix per tile position
        transformed = torch.einsum("iu,ocuv,jv->ijoc", g, weight, g)
        self.register_buffer("filters", transformed.reshape(side * side, out_channels, in_channels).float())
        # input transform B^T d B as a 6x6 kernel per tile position: (36, 1, 6, 6)
        self.register_buffer(
            "input_transform", torch.einsum("iu,jv->ijuv", bt, bt).reshape(side * side, 1, side, side).float()
        )
        # output transform A^T m A as a (16, 36) matrix
        self.register_buffer(
            "output_transform", torch.einsum("pi,qj->pqij", at, at).reshape(TILE * TILE, side * side).float()
        )
        bias = torch.zeros(out_channels, dtype=torch.float64) if bias is None else bias.detach().double()
        self.register_buffer("bias", bias.float().view(1, out_channels, 1, 1))
        self.out_channels = out_channels

    @classmethod
    def from_conv(
        cls,
        conv: torch.nn.Conv2d,
        norm: torch.nn.Module | None = None,
        *,
        whole_tiles: bool = False,
        strips: int = 1,
    ) -> WinogradConv3x3:
        if not is_winograd_compatible(conv):
            raise ValueError(f"not a plain 3x3 convolution: {conv}")
        weight, bias = conv.weight, conv.bias
        if norm is not None:
            weight, bias = fold_batch_norm(weight, bias, norm)
        return cls(weight, bias, whole_tiles=whole_tiles, strips=strips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        if not torch.jit.is_tracing() and batch != 1:
            raise ValueError(f"one image at a time (the channels go on the batch axis), not {batch}")
        rows = (height + TILE - 1) // TILE
        cols = (width + TILE - 1) // TILE
        if self.whole_tiles and not torch.jit.is_tracing() and (height % TILE or width % TILE):
            raise ValueError(f"{height}x{width} is not a multiple of {TILE}")
        if self.whole_tiles and self.strips > 1:
            padded = F.pad(x, (1, 1, 1, 1))
            bounds = [rows * i // self.strips for i in range(self.strips + 1)]
            outs = []
            for r0, r1 in itertools.pairwise(bounds):  # rows of tiles r0..r1, with their 1-pixel halo
                strip = padded[:, :, TILE * r0 : TILE * r1 + 2]
                tiles = F.conv2d(
                    strip.reshape(channels, 1, TILE * (r1 - r0) + 2, width + 2),
                    self.input_transform,
                    stride=TILE,
                )
                outs.append(self._tiles_to_output(tiles, r1 - r0, cols))
            return torch.cat(outs, 2) + self.bias
        if self.whole_tiles:
            # every channel's 6x6 tiles (stride 4, zero padding 1), transformed: (C, 36, rows, cols)
            tiles = F.conv2d(
                x.reshape(channels, 1, height, width), self.input_transform, stride=TILE, padding=1
            )
        else:
            # zero padding: 1 (the convolution's own) before, up to whole tiles after
            padded = F.pad(x, (1, TILE * cols + 1 - width, 1, TILE * rows + 1 - height))
            tiles = F.conv2d(
                padded.reshape(channels, 1, TILE * rows + 2, TILE * cols + 2),
                self.input_transform,
                stride=TILE,
            )
        out = self._tiles_to_output(tiles, rows, cols)
        if not self.whole_tiles:
            out = out[:, :, :height, :width]
        return out + self.bias

    def _tiles_to_output(self, tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(C, 36, rows, cols) transformed input tiles -> (1, C_out, 4 rows, 4 cols), no bias."""
        channels = tiles.shape[0]
        tiles = tiles.reshape(channels, -1, rows * cols).transpose(0, 1)  # (36, C, tiles)
        products = torch.matmul(self.filters, tiles)  # (36, C_out, tiles)
        out = torch.matmul(self.output_transform, products.reshape(products.shape[0], -1))
        # (4, 4, C_out, rows, cols) -> (C_out, rows, 4, cols, 4): written as a rank-6 depth-to-space
        # so that OpenVINO runs it as one fast transpose
        out = out.reshape(1, TILE, TILE, self.out_channels, rows, cols).permute(0, 3, 4, 1, 5, 2)
        return out.reshape(1, self.out_channels, TILE * rows, TILE * cols)
