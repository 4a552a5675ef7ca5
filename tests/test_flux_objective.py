"""FLUX.1's flow-matching objective: packing, ids, noising, target, timestep sampling, with exact values."""
from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.models.flux import objective as fm
from lora_trainer.models.flux import tiny


def test_packing_matches_flux_pipeline_and_round_trips():
    from diffusers import FluxPipeline

    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    packed = fm.pack_latents(x)
    assert packed.shape == (2, 2 * 3, 64)
    # token 0 holds the top-left 2x2 patch of every channel, channel by channel
    assert packed[0, 0, :8].tolist() == [0, 1, 6, 7, 24, 25, 30, 31]
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 4, 6))
    assert torch.equal(fm.unpack_latents(packed, 4, 6), x)
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 16, 3, 4))


def test_ids():
    from diffusers import FluxPipeline

    ids = fm.image_ids(4, 6)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    theirs = FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32)
    if theirs.shape[-2] != 6:  # diffusers 0.31 takes the latent's size, later versions the packed grid's
        theirs = FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    assert torch.equal(ids.expand_as(theirs), theirs)
    assert torch.equal(fm.text_ids(5), torch.zeros(5, 3))


def test_noise_target_and_vae_normalisation():
    x0, noise = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), -1.0)
    noisy = fm.noisy_latents(x0, noise, torch.tensor([0.25, 1.0]))
    assert noisy.flatten().tolist() == [1.25, -1.0]  # 0.75 * 2 + 0.25 * -1; pure noise at sigma 1
    assert fm.velocity_target(x0, noise).flatten().tolist() == [-3.0, -3.0]
    cfg = tiny.tiny_vae().config
    z = torch.tensor([1.0])
    assert fm.to_latents(z, cfg).item() == pytest.approx((1.0 - 0.1159) * 0.3611)
    assert fm.from_latents(fm.to_latents(z, cfg), cfg).item() == pytest.approx(1.0)


def test_shifts_exact_and_as_the_flux_scheduler_has_them():
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert fm.shift_sigmas(torch.tensor([0.5, 0.25, 0.0, 1.0]), 3.0).tolist() == [0.75, 0.5, 0.0, 1.0]
    assert fm.resolution_mu(256) == pytest.approx(0.5)
    assert fm.resolution_mu(4096) == pytest.approx(1.15)
    assert fm.resolution_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # 1024x1024 px: 4096 tokens / 4
    # the flux shift at u = 0.5 is sigmoid(mu)
    mu = fm.resolution_mu(1024)
    assert fm.shift_sigmas(torch.tensor([0.5]), math.exp(mu)).item() == pytest.approx(1 / (1 + math.exp(-mu)))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    u = torch.linspace(1.0, 0.1, 10)
    sched.set_timesteps(sigmas=u.numpy(), mu=mu)  # as FluxPipeline calls it
    torch.testing.assert_close(sched.sigmas[:-1].float(), fm.shift_sigmas(u, math.exp(mu)), rtol=1e-5, atol=1e-6)


def test_timestep_sampling_methods():
    def sample(method, **kw):
        return fm.sample_sigmas(4, method, generator=torch.Generator().manual_seed(7), **kw)

    g = torch.Generator().manual_seed(7)
    assert torch.equal(sample("uniform"), torch.rand(4, generator=g))
    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(2.0 * torch.randn(4, generator=g))
    assert torch.equal(sample("sigmoid", sigmoid_scale=2.0), u)
    torch.testing.assert_close(sample("shift", sigmoid_scale=2.0, shift=3.0), 3 * u / (1 + 2 * u))
    torch.testing.assert_close(sample("flux_shift", sigmoid_scale=2.0, image_seq_len=1024),
                               fm.shift_sigmas(u, math.exp(fm.resolution_mu(1024))))
    s = fm.sample_sigmas(1000, "shift", generator=torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1 and s.mean() > 0.6  # shift 3 favours the noisy end
    with pytest.raises(ValueError, match="image tokens"):
        sample("flux_shift")
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample("cosine")


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_predict_calls_the_transformer_as_flux_pipeline_does(guidance):
    transformer = tiny.tiny_transformer(guidance=guidance)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    text, pooled = torch.randn(2, 5, tiny.TEXT_DIM, generator=g), torch.randn(2, tiny.TEXT_DIM, generator=g)
    sigmas = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        pred, target = fm.predict(transformer, x0, noise, sigmas, text, pooled, guidance=3.5)
        kw = {"guidance": torch.tensor([3.5, 3.5])} if guidance else {}
        direct = transformer(hidden_states=fm.pack_latents((1 - sigmas.view(2, 1, 1, 1)) * x0 + sigmas.view(2, 1, 1, 1)
                                                           * noise),
                             encoder_hidden_states=text, pooled_projections=pooled, timestep=sigmas,
                             img_ids=fm.image_ids(4, 6), txt_ids=fm.text_ids(5), return_dict=False, **kw)[0]
    assert pred.shape == target.shape == x0.shape
    assert torch.equal(pred, fm.unpack_latents(direct, 4, 6))
    assert torch.equal(target, noise - x0)
