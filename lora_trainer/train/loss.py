"""Diffusion training loss: epsilon or v target, min-SNR-gamma weighting, noise offset."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sample_noise(shape: tuple, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise of `shape` (batch, channels, h, w) drawn on the CPU generator, in fp32 on the CPU
    (identical on every device and process, and resumable)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        # A per-channel constant lets the model learn to shift overall brightness (very dark/bright images).
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR+1) for v."""
    s = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler,
                   min_snr_gamma: Optional[float], sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    if min_snr_gamma:
        loss = loss * min_snr_weight(noise_scheduler, timesteps, min_snr_gamma)
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.device, loss.dtype)
    return loss.mean()
