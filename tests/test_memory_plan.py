"""The memory planner: its trace on the meta device keeps what a real forward pass keeps, it scales the way training
memory does, and it names the one change that makes a run fit (in the tab before Start, and in the run's log)."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.models.meta import meta_model
from lora_trainer.models.tiny import build_tiny, tiny_ldm_state_dict
from lora_trainer.network.base import create_network
from lora_trainer.train import memory_plan as mp


def cfg_of(**kw) -> TrainConfig:
    base = dict(resolution=64, batch_size=2, lora_rank=4, mixed_precision="no", cache_latents=True)
    base.update(kw)
    return TrainConfig(**base)


def _real_kept(model, cfg: TrainConfig, autocast) -> int:
    """What autograd keeps in a real forward pass of the tiny model with the run's LoRA (CPU tensors)."""
    network = create_network(model, cfg)
    try:
        modules = [model.unet, *model.text_encoders]
        kept = mp._Kept({p.untyped_storage()._cdata for m in modules for p in m.parameters()})
        b, side = cfg.batch_size, cfg.resolution // 8
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            with torch.no_grad():
                out = model.text_encoders[0](torch.zeros(b, 77, dtype=torch.long), output_hidden_states=True)
            embeds = out.hidden_states[-2]
            with kept.hooks():
                model.unet(torch.randn(b, 4, side, side), torch.full((b,), 500), encoder_hidden_states=embeds)
        return kept.total
    finally:
        network.remove()


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_the_meta_trace_keeps_what_a_real_forward_keeps(autocast):
    model = build_tiny("sd1")
    cfg = cfg_of(mixed_precision="bf16" if autocast else "no")
    real = _real_kept(model, cfg, autocast)
    meta = meta_model(model)
    create_network(meta, cfg)
    traced = sum(mp._trace_training(meta, cfg, autocast))  # activations + autocast's copies of weights
    assert real > 0
    assert abs(traced / real - 1) < 0.15, (traced, real)


def test_the_estimate_scales_like_training_memory():
    model = build_tiny("sd1")
    one = mp.estimate_memory(model, cfg_of(batch_size=1, resolution=128), "cpu", resident=True)
    four = mp.estimate_memory(model, cfg_of(batch_size=4, resolution=128), "cpu", resident=True)
    assert 3.3 < four.activations / one.activations < 4.3
    bigger = mp.estimate_memory(model, cfg_of(batch_size=1, resolution=256), "cpu", resident=True)
    assert bigger.activations > 3 * one.activations
    checkpointed = mp.estimate_memory(model, cfg_of(batch_size=4, resolution=128, gradient_checkpointing=True),
                                      "cpu", resident=True)
    assert checkpointed.activations < 0.8 * four.activations
    with_te = mp.estimate_memory(model, cfg_of(batch_size=4, resolution=128, train_text_encoder=True), "cpu",
                                 resident=True)
    assert with_te.trainable > four.trainable and with_te.activations > four.activations
    lora_params = sum(p.numel() for p in create_network(meta_model(model), cfg_of()).parameters())
    assert four.trainable == lora_params * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    # resident weights are not extra; loaded ones are
    assert four.extra == four.peak - four.weights
    own = mp.estimate_memory(model, cfg_of(batch_size=4, resolution=128), "cpu", resident=False)
    assert own.extra == own.peak


def test_a_hosts_checkpoint_is_planned_from_its_shapes_alone():
    from lora_trainer.hosts.base import LoadedCheckpoint

    sd, original = tiny_ldm_state_dict("sdxl")
    loaded = LoadedCheckpoint(state_dict=sd, family="sdxl", title="tiny", original_config=original)
    meta = meta_model(loaded)
    assert meta.family == "sdxl" and all(p.is_meta for p in meta.unet.parameters())
    estimate = mp.estimate_memory(loaded, cfg_of(), "cpu", resident=True)
    in_file = sum(t.numel() * t.element_size() for t in sd.values())
    assert 0.9 * in_file < estimate.weights <= in_file
    assert estimate.activations > 0


def test_the_plan_names_the_one_change_that_makes_it_fit():
    model = build_tiny("sd1")
    cfg = cfg_of(batch_size=4, resolution=256, cache_latents=False)  # (the tiny VAE's caching would dominate)
    need = mp.estimate_memory(model, cfg, "cuda", resident=True)
    checkpointed = mp.estimate_memory(model, cfg.replace(gradient_checkpointing=True), "cuda", resident=True)
    free = (need.extra + checkpointed.extra) // 2
    plan = mp.plan_memory(model, cfg, torch.device("cuda"), resident=True, free=free, can_8bit=False)
    assert plan.fits is False and plan.fix.startswith("turn on gradient checkpointing")
    assert plan.fixed_config.gradient_checkpointing and plan.fixed.extra <= free
    text = plan.describe()
    assert "Will not fit" in text and "To fit: turn on gradient checkpointing" in text

    # gradient checkpointing on already: the next change that fits (same effective batch)
    plan = mp.plan_memory(model, cfg.replace(gradient_checkpointing=True), torch.device("cuda"), resident=True,
                          free=checkpointed.extra * 2 // 3, can_8bit=False)
    assert plan.fix and plan.fixed.extra <= checkpointed.extra * 2 // 3
    if plan.fixed_config.batch_size != cfg.batch_size:
        assert plan.fixed_config.batch_size * plan.fixed_config.gradient_accumulation_steps == 4

    hopeless = mp.plan_memory(model, cfg, torch.device("cuda"), resident=True, free=1, can_8bit=False)
    assert hopeless.fix is None and "No single change makes it fit" in hopeless.describe()
    fits = mp.plan_memory(model, cfg, torch.device("cuda"), resident=True, free=need.extra * 2, can_8bit=False)
    assert fits.fits and "Fits" in fits.describe()


def test_the_tab_shows_the_estimate_and_start_asks_once_when_it_will_not_fit(tmp_path, tiny_files, monkeypatch):
    from conftest import make_images

    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.controller import TabController
    from lora_trainer.ui.form import config_to_form
    from lora_trainer.ui.jobs import JobRunner

    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs", log=lambda *_: None)
    ctl = TabController(host, JobRunner())
    data = make_images(tmp_path / "data", n=2)
    values = config_to_form(cfg_of(output_name="mem", max_train_steps=1, log_with="none"))
    assert ctl.memory(values, str(data)).startswith("Estimated peak memory on CPU:")

    monkeypatch.setattr(mp, "free_memory", lambda device: 1024)
    msg, memory = ctl.start(values, str(data))
    assert msg.startswith("not started: the estimate says this run will not fit") and "Will not fit" in memory
    assert ctl.runner.job is None
    msg, _ = ctl.start(values, str(data))  # the same settings again: the person decided
    assert msg.startswith("started mem"), msg
    assert ctl.runner.wait(300)
    log = "\n".join(e["message"] or "" for e in ctl.runner.events_since(0)[0])
    assert ctl.runner.status()["state"] == "finished", ctl.runner.status()
    assert "Estimated peak memory on CPU" in log and "Will not fit" in log


def test_an_estimate_leaves_torch_alone_for_other_threads():
    """A WebUI may generate while someone presses Estimate memory: nothing of torch is patched for the trace."""
    import threading

    import torch.nn.functional as F
    import torch.utils.checkpoint as cp

    sdpa, checkpoint = F.scaled_dot_product_attention, cp.checkpoint
    q = torch.randn(1, 2, 16, 8)
    expected = F.scaled_dot_product_attention(q, q, q)
    model = build_tiny("sd1")
    done = threading.Event()

    def estimates():
        for checkpointing in (False, True, False):
            mp.estimate_memory(model, cfg_of(gradient_checkpointing=checkpointing), "cpu", resident=True)
        done.set()

    worker = threading.Thread(target=estimates)
    worker.start()
    mismatches = runs = 0
    while not done.is_set() and worker.is_alive():
        mismatches += not torch.equal(F.scaled_dot_product_attention(q, q, q), expected)
        runs += 1
    worker.join()
    assert done.is_set() and runs > 0 and mismatches == 0
    assert F.scaled_dot_product_attention is sdpa and cp.checkpoint is checkpoint


@pytest.mark.parametrize("kind", [dict(network_type="loha"), dict(network_type="lokr"), dict(use_dora=True)])
def test_every_network_type_is_planned_and_traced_like_a_real_forward(kind):
    model = build_tiny("sd1")
    cfg = cfg_of(**kind)
    real = _real_kept(model, cfg, None)
    meta = meta_model(model)
    create_network(meta, cfg)
    traced = sum(mp._trace_training(meta, cfg, None))
    assert abs(traced / real - 1) < 0.25, (kind, traced, real)
    estimate = mp.estimate_memory(model, cfg, "cpu", resident=True)
    assert estimate.trainable > 0 and estimate.activations > 0
