"""FLUX.1's training objective: rectified flow on packed latents.

x_sigma = (1 - sigma) * x0 + sigma * noise, and the transformer predicts the velocity noise - x0. sigma in (0, 1)
is also the transformer's timestep input (FluxPipeline passes scheduler timesteps / 1000). Latents are the VAE's
(z - shift_factor) * scaling_factor, packed 2x2 into tokens of 4 * 16 channels, each with a (0, row, column) id;
text tokens have zero ids. dev takes the distilled guidance as an input, schnell has none.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..low_precision import float_dtype

TIMESTEP_SAMPLING = ("uniform", "sigmoid", "shift", "flux_shift")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch becomes one token (channels outermost in the token)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 (image sides a multiple of 16)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for a latent of height x width."""
    b, _, dim = tokens.shape
    c = dim // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[(H/2)(W/2), 3] positions of the packed tokens of a height x width latent: (0, row, column)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(length, 3, device=device, dtype=dtype)


def to_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE sample -> what the transformer sees (Flux's VAE has a shift factor as well as a scale)."""
    return (z - (vae_config.shift_factor or 0.0)) * vae_config.scaling_factor


def from_latents(x: torch.Tensor, vae_config) -> torch.Tensor:
    return x / vae_config.scaling_factor + (vae_config.shift_factor or 0.0)


def resolution_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """The log-shift Flux uses at a number of image tokens: linear from base_shift at 256 to max_shift at 4096."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """shift * u / (1 + (shift - 1) * u): moves sigmas towards the noisy end for shift > 1 (SD3 / Flux)."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(batch: int, method: str = "sigmoid", *, generator: Optional[torch.Generator] = None,
                  sigmoid_scale: float = 1.0, shift: float = 3.0, image_seq_len: Optional[int] = None,
                  device=None) -> torch.Tensor:
    """sigma per sample, in (0, 1).

    uniform: U(0, 1). sigmoid: logit-normal, sigmoid(sigmoid_scale * N(0, 1)). shift: the logit-normal sample
    shifted by `shift`. flux_shift: shifted by exp(mu) with mu from the image's token count (resolution_mu),
    as Flux's own sampling schedule does.
    """
    if method not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, not {method!r}")
    if method == "uniform":
        return torch.rand(batch, generator=generator).to(device)
    u = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator)).to(device)
    if method == "sigmoid":
        return u
    if method == "shift":
        return shift_sigmas(u, shift)
    if image_seq_len is None:
        raise ValueError("flux_shift needs the number of image tokens")
    return shift_sigmas(u, math.exp(resolution_mu(image_seq_len)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predict(transformer, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor,
            pooled: torch.Tensor, guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target), both [B, C, H, W], for latents x0 [B, C, H, W] (already shifted and scaled)."""
    b, _, h, w = latents.shape
    dtype = float_dtype(transformer)  # not the fp8 / nf4 storage of a low-precision base
    device = latents.device
    x = pack_latents(noisy_latents(latents, noise, sigmas)).to(dtype)
    kwargs = {}
    if transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.full((b,), float(guidance), device=device, dtype=dtype)
    out = transformer(hidden_states=x, encoder_hidden_states=text.to(dtype), pooled_projections=pooled.to(dtype),
                      timestep=sigmas.to(device, dtype), img_ids=image_ids(h, w, device, dtype),
                      txt_ids=text_ids(text.shape[1], device, dtype), return_dict=False, **kwargs)[0]
    return unpack_latents(out, h, w), velocity_target(latents, noise)
