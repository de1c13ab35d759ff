"""Codecs between pixel videos and latent videos, behind one interface.

Videos are [B, F, 3, H, W] in [-1, 1]; latents are [B, F', C, h, w]. `stream_decoder()` returns an
object whose `decode(latent_block)` yields the pixel frames of each latent block as it is produced,
so a long generation is written to disk while it runs.

The toy preset uses `ToyDCTCodec`, which has no parameters. Wan2.1's VAE (`video.codec=wan_vae`,
loaded from the published weights) arrives with the real-weights work.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from hiar.config import VideoConfig


class StreamDecoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class Codec(Protocol):
    latent_channels: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def stream_decoder(self) -> StreamDecoder: ...


def _dct_basis(n: int) -> torch.Tensor:
    """Orthonormal DCT-II basis [n (frequency), n (position)]."""
    pos = torch.arange(n, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * (pos + 0.5) * u / n) for u in range(n)])
    basis[0] /= math.sqrt(2)
    return basis * math.sqrt(2 / n)


class ToyDCTCodec:
    """Parameter-free codec of the toy world: 8x8 RGB patches -> 16 DCT coefficients.

    Colours go to an orthonormal opponent space (luma (r+g+b)/sqrt3, chroma (r-g)/sqrt2 and
    (r+g-2b)/sqrt6); each 8x8 patch keeps the low frequencies u + v <= 3 of luma (10 coefficients)
    and u + v <= 1 of each chroma channel (3 + 3). Rows of the resulting [16, 192] map are
    orthonormal, so decoding is its transpose: the least-squares reconstruction. Coefficients are
    divided by 8, which puts a flat patch's luma DC at sqrt3 * value, within about [-2, 2]. Each
    latent frame is one video frame (temporal stride 1), so streaming decode is exact by construction.
    """

    latent_channels = 16
    patch = 8
    scale = 8.0

    def __init__(self) -> None:
        p = self.patch
        colour = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
        colour = colour / colour.norm(dim=1, keepdim=True)  # [3 opponent, 3 rgb]
        dct = _dct_basis(p)
        rows = []
        for channel, max_freq in ((0, 3), (1, 1), (2, 1)):
            for total in range(max_freq + 1):
                for u in range(total + 1):
                    v = total - u  # zig-zag: lower total frequency first
                    patch = torch.outer(dct[u], dct[v])  # [p, p]
                    rows.append(torch.einsum("c,hw->chw", colour[channel], patch).flatten())
        self.basis = torch.stack(rows).float()  # [16, 3 * p * p], orthonormal rows

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, f = video.shape[:2]
        patches = F.pixel_unshuffle(video.flatten(0, 1).float(), self.patch)  # [B*F, 3*p*p, h, w]
        coeffs = torch.einsum("kc,nchw->nkhw", self.basis.to(video.device), patches)
        return (coeffs / self.scale).unflatten(0, (b, f))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, f = latents.shape[:2]
        patches = torch.einsum("kc,nkhw->nchw", self.basis.to(latents.device), latents.flatten(0, 1).float() * self.scale)
        return F.pixel_shuffle(patches, self.patch).clamp(-1, 1).unflatten(0, (b, f))

    def stream_decoder(self) -> ToyDCTCodec:
        return self  # frame-wise: a block decodes on its own


def build_codec(video: VideoConfig) -> Codec:
    if video.codec == "toy_dct":
        return ToyDCTCodec()
    raise NotImplementedError("the Wan2.1 VAE (video.codec=wan_vae) needs the published weights, whose loader "
                              "is not built yet; the toy presets (configs/toy/hiar.yaml) run today")
