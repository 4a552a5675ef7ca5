"""The memory planner on FLUX.1: its meta trace of a transformer step keeps what a real step keeps (tiny Flux),
the estimate counts what a Flux run holds (transformer, T5 + CLIP, VAE, LoRA and optimizer), and full-size
FLUX.1-dev on the meta device gives the figures Flux trainers know (bench/bench_flux_memory.py prints them)."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.models.flux import tiny
from lora_trainer.models.flux.model import FluxModel
from lora_trainer.models.meta import meta_model
from lora_trainer.network.base import create_network
from lora_trainer.train import memory_plan as mp
from lora_trainer.train.flux_memory import image_tokens, trace_flux_training
from lora_trainer.train.kinds import kind_of

GIB = 2 ** 30


def tiny_flux(guidance: bool = True) -> FluxModel:
    c = tiny.tiny_flux_components(guidance=guidance)
    model = FluxModel(transformer=c["transformer"], vae=c["vae"], text_encoders=[c["text_encoder"], c["text_encoder_2"]],
                      tokenizers=[c["tokenizer"], c["tokenizer_2"]], noise_scheduler=c["scheduler"])
    model.freeze()
    return model


def flux_cfg(**kw) -> TrainConfig:
    base = dict(model_family="flux", resolution=64, batch_size=2, lora_rank=4, mixed_precision="no",
                cache_latents=True, t5xxl_max_token_length=64)
    base.update(kw)
    return TrainConfig(**base)


def with_fp8(cfg: TrainConfig, on: bool = True) -> TrainConfig:
    return cfg.replace(fp8_base=on)


def _real_kept(model: FluxModel, cfg: TrainConfig, autocast) -> int:
    """What autograd keeps in a real transformer forward of the tiny Flux with the run's LoRA (CPU tensors)."""
    network = create_network(model, cfg)
    try:
        modules = [model.transformer, *model.text_encoders]
        kept = mp._Kept({p.untyped_storage()._cdata for m in modules for p in m.parameters()})
        kw = tiny.transformer_inputs(model.transformer, side=cfg.resolution // 16,
                                     text_tokens=cfg.t5xxl_max_token_length)
        kw = {k: v.repeat(cfg.batch_size, *[1] * (v.dim() - 1)) if k in ("hidden_states", "encoder_hidden_states",
                                                                        "pooled_projections") else v
              for k, v in kw.items()}
        kw["timestep"] = kw["timestep"].repeat(cfg.batch_size)
        kw["guidance"] = kw["guidance"].repeat(cfg.batch_size)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            with kept.hooks():
                model.transformer(**kw)
        return kept.total
    finally:
        network.remove()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_meta_trace_keeps_what_a_real_flux_step_keeps(autocast):
    model = tiny_flux()
    cfg = flux_cfg(mixed_precision="bf16" if autocast else "no")
    real = _real_kept(model, cfg, autocast)
    meta = meta_model(model)
    kind_of(meta).configure(meta, cfg)  # the run's T5 length
    create_network(meta, cfg)
    traced = sum(trace_flux_training(meta, cfg, autocast))  # activations + autocast's copies of weights
    assert real > 0
    assert abs(traced / real - 1) < 0.15, (traced, real)


def test_the_flux_estimate_counts_what_a_flux_run_holds():
    model = tiny_flux()
    one = mp.estimate_memory(model, flux_cfg(batch_size=1), "cpu", resident=True)
    nbytes = lambda *ms: sum(p.numel() * p.element_size() for m in ms for p in m.parameters())  # noqa: E731
    assert one.weights == nbytes(model.transformer, *model.text_encoders, model.vae)
    assert one.kept_text_encoders == nbytes(*model.text_encoders)  # T5 + CLIP stay loaded for the whole run
    lora_params = sum(p.numel() for p in create_network(meta_model(model), flux_cfg()).parameters())
    assert one.trainable == lora_params * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    assert mp.estimate_memory(model, flux_cfg(batch_size=1, optimizer="adamw8bit"), "cpu",
                              resident=True).trainable == lora_params * (4 + 4 + 2)

    # activations follow the batch, the image tokens ((res/16)^2) and the T5 length; checkpointing cuts them
    four = mp.estimate_memory(model, flux_cfg(batch_size=4), "cpu", resident=True)
    assert 3.3 < four.activations / one.activations < 4.3
    assert image_tokens(flux_cfg(resolution=128)) == 64 and image_tokens(flux_cfg(resolution="128,64")) == 32
    bigger = mp.estimate_memory(model, flux_cfg(batch_size=1, resolution=256, t5xxl_max_token_length=16), "cpu",
                                resident=True)
    small = mp.estimate_memory(model, flux_cfg(batch_size=1, resolution=64, t5xxl_max_token_length=16), "cpu",
                               resident=True)
    assert bigger.activations > 8 * small.activations  # 16x the image tokens
    longer = mp.estimate_memory(model, flux_cfg(batch_size=1, t5xxl_max_token_length=256), "cpu", resident=True)
    assert longer.activations > 2 * one.activations  # 256 text tokens beside 16 image tokens
    checkpointed = mp.estimate_memory(model, flux_cfg(batch_size=4, gradient_checkpointing=True), "cpu",
                                      resident=True)
    assert checkpointed.activations < 0.8 * four.activations

    # fp8_base: the transformer's Linear weights at one byte each, the rest as before
    fp8 = mp.estimate_memory(model, with_fp8(flux_cfg(batch_size=1)), "cpu", resident=True)
    linear_params = sum(m.weight.numel() for m in model.transformer.modules() if isinstance(m, torch.nn.Linear))
    assert one.weights - fp8.weights == 3 * linear_params  # fp32 -> fp8
    assert fp8.activations == one.activations


def test_a_flux_runs_log_line_names_the_text_encoders():
    model = tiny_flux()
    note = mp.memory_note(model, flux_cfg(), torch.device("cpu"))
    assert note and note.startswith("Estimated peak memory on CPU:") and "text encoders" in note
    # a schnell model (no guidance embedder) is planned too, with schnell's 256 T5 tokens when unset
    schnell = tiny_flux(guidance=False)
    assert schnell.t5_length == 256 and tiny_flux().t5_length == 512
    assert mp.estimate_memory(schnell, flux_cfg(t5xxl_max_token_length=None), "cpu", resident=True).activations > 0


def test_the_plan_can_name_fp8_storage_as_the_fix():
    fix = next(change for words, change in mp.FIXES if "fp8_base" in words)
    assert fix(with_fp8(flux_cfg(), True)) is None  # on already
    assert fix(flux_cfg(fp8_base=False)).fp8_base is True


# --- full-size FLUX.1-dev on the meta device ---------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_dev():
    from lora_trainer.models.flux.full_size import full_size_flux

    return full_size_flux("dev")


def full_cfg(resolution: int, checkpointing: bool, fp8: bool, **extra) -> TrainConfig:
    cfg = TrainConfig(model_family="flux", resolution=resolution, batch_size=1, lora_rank=16, lora_alpha=16,
                      mixed_precision="bf16", optimizer="adamw8bit", gradient_checkpointing=checkpointing,
                      cache_latents=True, **extra)
    return with_fp8(cfg, fp8)


def test_full_size_flux_dev_gives_the_figures_flux_trainers_know(flux_dev):
    params = {name: sum(p.numel() for p in m.parameters()) / 1e9
              for name, m in (("transformer", flux_dev.transformer), ("clip", flux_dev.text_encoders[0]),
                              ("t5", flux_dev.text_encoders[1]))}
    assert 11.8 < params["transformer"] < 12.0 and 4.7 < params["t5"] < 4.8 and 0.12 < params["clip"] < 0.13

    def estimate(res, gc, fp8, **extra):
        return mp.estimate_memory(flux_dev, full_cfg(res, gc, fp8, **extra), "cuda", resident=False)

    # T5 and CLIP encode every caption before training and leave the GPU (as kohya's cached-text-encoder runs):
    # the weights on the GPU are the transformer's 22 GiB in bf16 and the VAE
    bf16_1024 = estimate(1024, False, False)
    assert bf16_1024.kept_text_encoders == 0 and 22 * GIB < bf16_1024.weights < 23 * GIB
    assert bf16_1024.peak > 24 * GIB
    checkpointed = estimate(1024, True, False)
    assert checkpointed.activations < 0.1 * bf16_1024.activations
    # bf16 + checkpointing at 1024 is still over 24 GiB (kohya: "> 26 GB, add --fp8_base"); fp8 brings it under,
    # and fp8 at 512 under 16 GiB
    assert checkpointed.peak > 24 * GIB
    fp8_1024 = estimate(1024, True, True)
    assert 12 * GIB < fp8_1024.peak < 20 * GIB
    fp8_512 = estimate(512, True, True)
    assert 11 * GIB < fp8_512.peak < 16 * GIB
    assert fp8_1024.weights - fp8_512.weights == 0 and fp8_1024.activations > 2 * fp8_512.activations
    # shuffled captions are encoded as they come: T5 + CLIP (~9 GiB) stay, and fp8 at 512 no longer fits 16 GiB
    shuffled = estimate(512, True, True, shuffle_caption=True)
    assert 8.5 * GIB < shuffled.kept_text_encoders < 9.5 * GIB
    assert shuffled.peak - shuffled.kept_text_encoders == fp8_512.peak and 16 * GIB < shuffled.peak < 24 * GIB
    # on a host's model (Forge) the text encoders are the host's and stay where it keeps them
    assert 8.5 * GIB < mp.estimate_memory(flux_dev, full_cfg(512, True, True), "cuda",
                                          resident=True).kept_text_encoders < 9.5 * GIB


# --- the tab's FLUX.1 presets ---------------------------------------------------------------------------------
TIER_GIB = {"6-8 GB": 8, "10-12 GB": 12, "16 GB": 16, "24 GB+": 24}
TIER_LOW_GIB = {"6-8 GB": 6, "10-12 GB": 10, "16 GB": 16, "24 GB+": 24}


def test_every_flux_preset_is_a_valid_flux_config():
    from lora_trainer.ui.presets import GOALS, TIERS, preset

    for tier, goal in ((t, g) for t in TIERS for g in GOALS):
        values = preset(tier, goal, "flux")
        cfg = TrainConfig(model_family="flux", **values)  # validates every key and value
        assert (cfg.lora_rank, cfg.effective_alpha, cfg.learning_rate, cfg.batch_size) == (16, 16.0, 1e-4, 1)
        assert cfg.optimizer in ("adamw", "adamw8bit") and not cfg.min_snr_gamma and not cfg.train_text_encoder
        assert cfg.guidance_scale == 1.0 and cfg.timestep_sampling in ("sigmoid", "flux_shift")
        assert (cfg.sample_cfg_scale, cfg.sample_steps) == (3.5, 20)
        if tier != "CPU / test":
            assert cfg.gradient_checkpointing and cfg.mixed_precision == "bf16"
            assert 1000 <= cfg.max_train_steps <= 2000
            assert cfg.resolution == (1024 if tier == "24 GB+" else 512)
            assert cfg.fp8_base is True
    assert preset("16 GB", "character", "flux")["max_train_steps"] == 1500
    assert preset("16 GB", "style", "flux", "loha")["network_type"] == "lora"  # Flux trains plain LoRA only
    assert preset("24 GB+", "style", "sdxl")["min_snr_gamma"] == 5.0  # the SD presets are unchanged


def test_the_flux_presets_fit_their_tiers_on_full_size_flux_dev(flux_dev):
    """The planner on FLUX.1-dev with each tier's preset (T5 and CLIP encode the captions first and leave the GPU):
    every tier fits the smaller card it names with half a GiB to spare (6-8 GB and 10-12 GB by swapping blocks). With
    shuffled captions T5 + CLIP (~9 GiB) stay loaded, and only the swapping tiers' lower weights leave room."""
    verdict, peaks = {}, {}
    for tier, gib_ in TIER_GIB.items():
        cfg = TrainConfig(model_family="flux", **preset_of(tier))
        shuffled = cfg.replace(shuffle_caption=True)
        peaks[tier] = mp.estimate_memory(flux_dev, cfg, "cuda", resident=False).peak / GIB
        verdict[tier] = (peaks[tier] <= TIER_LOW_GIB[tier] - 0.5,
                         mp.estimate_memory(flux_dev, shuffled, "cuda", resident=False).peak <= gib_ * GIB)
    assert verdict == {"6-8 GB": (True, False), "10-12 GB": (True, False), "16 GB": (True, False),
                       "24 GB+": (True, False)}, (verdict, peaks)
    # the swapping tiers are not swapping more than they need: half as many blocks would not fit
    for tier in ("6-8 GB", "10-12 GB"):
        cfg = TrainConfig(model_family="flux", **preset_of(tier))
        half = cfg.replace(blocks_to_swap=cfg.blocks_to_swap // 2)
        assert mp.estimate_memory(flux_dev, half, "cuda", resident=False).peak > (TIER_LOW_GIB[tier] - 0.5) * GIB


def test_swapping_blocks_and_nf4_take_the_weights_they_keep_off_the_gpu(flux_dev):
    """blocks_to_swap: the swapped blocks' Linear weights leave the GPU but for one layer in flight; nf4 stores
    each of those weights in ~0.52 bytes; the activations are the same."""
    from lora_trainer.models.flux.block_swap import swapped_blocks

    base = TrainConfig(model_family="flux", resolution=512, mixed_precision="bf16", gradient_checkpointing=True,
                       fp8_base=True, optimizer="adamw8bit")
    fp8 = mp.estimate_memory(flux_dev, base, "cuda", resident=False)
    swap = mp.estimate_memory(flux_dev, base.replace(blocks_to_swap=18), "cuda", resident=False)
    linears = [m.weight.numel() for b in swapped_blocks(flux_dev.transformer, 18) for m in b.modules()
               if isinstance(m, torch.nn.Linear)]
    assert fp8.weights - swap.weights == sum(linears) - max(linears)  # fp8: a byte a weight
    assert swap.activations == fp8.activations and swap.trainable == fp8.trainable
    nf4 = mp.estimate_memory(flux_dev, base.replace(fp8_base=False, nf4_base=True), "cuda", resident=False)
    transformer_linears = sum(m.weight.numel() for m in flux_dev.transformer.modules()
                              if isinstance(m, torch.nn.Linear))
    assert 0.51 < 1 - (fp8.weights - nf4.weights) / transformer_linears < 0.53
    assert nf4.activations == fp8.activations
    # a host's model is never re-stored or swapped: its plan does not offer these fixes
    plan = mp.plan_memory(flux_dev, base.replace(fp8_base=False), torch.device("cuda"), resident=True,
                          free=int(14 * GIB), can_8bit=True)
    assert plan.fix is None or "FLUX.1" not in plan.fix
    own = mp.plan_memory(flux_dev, base, torch.device("cuda"), resident=False, free=int(10 * GIB), can_8bit=True)
    # the least swapping that fits: 8 blocks leave 11 GiB, 16 fit in 10
    assert own.fix and "blocks_to_swap: 16" in own.fix and own.fixed_config.blocks_to_swap == 16


def preset_of(tier: str) -> dict:
    from lora_trainer.ui.presets import preset

    return preset(tier, "character", "flux")
