"""FLUX.1 LoRA: targets, kohya's Flux key names, the fused qkv / linear1 written exactly, and diffusers reading it."""
from __future__ import annotations

import logging

import pytest
import torch

from lora_trainer.config import ConfigError
from lora_trainer.models.flux import tiny
from lora_trainer.models.flux.model import FluxModel
from lora_trainer.network.base import create_network
from lora_trainer.network.kohya_file import read_lora, save_lora

from conftest import base_config

_DOUBLE_STEMS = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                 "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"]
_SINGLE_STEMS = ["linear1", "linear2", "modulation_lin"]


def _bundle(**transformer_kwargs) -> FluxModel:
    c = tiny.tiny_flux_components(**transformer_kwargs)
    model = FluxModel(transformer=c["transformer"], vae=c["vae"], text_encoders=[c["text_encoder"], c["text_encoder_2"]],
                      tokenizers=[c["tokenizer"], c["tokenizer_2"]], noise_scheduler=c["scheduler"], name="tiny-flux")
    model.freeze()
    return model


def _randomize(net, seed=0):
    """LoRA up matrices start at zero; give every factor values so that each delta is distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _expected_stems(num_double, num_single):
    return sorted([f"lora_unet_double_blocks_{i}_{s}" for i in range(num_double) for s in _DOUBLE_STEMS] +
                  [f"lora_unet_single_blocks_{i}_{s}" for i in range(num_single) for s in _SINGLE_STEMS])


def test_flux_file_has_kohya_flux_names_and_exact_fused_modules():
    model = _bundle(num_double=2, num_single=2)
    cfg = base_config(lora_rank=4, lora_alpha=2)
    net = create_network(model, cfg)
    _randomize(net)
    sd = net.state_dict()
    assert sorted({k.split(".")[0] for k in sd}) == _expected_stems(2, 2)
    assert len(sd) == 3 * 26
    width = 2 * 32
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * 4, width)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * width, 3 * 4)
    assert sd["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * width + 4 * width, 4 * 4)
    assert float(sd["lora_unet_double_blocks_0_txt_attn_qkv.alpha"]) == 3 * 2
    assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * 2
    assert float(sd["lora_unet_single_blocks_0_linear2.alpha"]) == 2
    deltas = net.deltas()
    groups = {g.stem: g for g in net.file_layout.groups}
    assert len(groups) == 2 * 2 + 2
    for stem in {k.split(".")[0] for k in sd}:
        down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
        delta = up @ down * float(sd[f"{stem}.alpha"]) / down.shape[0]
        parts = groups[stem].parts if stem in groups else (stem,)
        torch.testing.assert_close(delta, torch.cat([deltas[p] for p in parts]), rtol=1e-5, atol=1e-7)
    # read back (resume): the same per-module weights
    other = create_network(_bundle(num_double=2, num_single=2), cfg)
    other.load_state_dict(sd)
    for name, value in other.state_dict().items():
        assert torch.equal(value, sd[name]), name


def test_a_lora_over_the_whole_fused_weight_is_refused_for_continuing():
    model = _bundle()
    net = create_network(model, base_config(lora_rank=4))
    _randomize(net)
    sd = net.state_dict()
    sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] += 0.01  # no longer block-diagonal
    with pytest.raises(ConfigError, match="not block-diagonal"):
        create_network(_bundle(), base_config(lora_rank=4)).load_state_dict(sd)
    with pytest.raises(ConfigError, match="fused modules"):
        create_network(_bundle(), base_config(network_type="loha"))


def test_clip_text_encoder_is_lora_te1():
    net = create_network(_bundle(), base_config(train_text_encoder=True))
    stems = {k.split(".")[0] for k in net.state_dict()}
    te = sorted(s for s in stems if s.startswith("lora_te"))
    assert te[0].startswith("lora_te1_text_model_encoder_layers_0_") and len(te) == 6 * 3  # tiny CLIP: 3 layers
    assert not any("lora_te2" in s for s in stems)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_diffusers_applies_every_key_of_the_file_to_a_real_width_flux(tmp_path):
    """diffusers converts kohya Flux files itself (it assumes Flux's real width 3072 for linear1)."""
    from diffusers import FluxPipeline
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:  # diffusers loads LoRAs into Flux only through peft, which needs transformers >= 4.34
        pytest.skip("this diffusers cannot load LoRAs into FLUX.1 with this transformers (no PEFT backend)")
    model = _bundle(heads=24, head_dim=128, num_double=1, num_single=1)
    transformer = model.transformer
    inputs = tiny.transformer_inputs(transformer)
    with torch.no_grad():
        base_out = transformer(**inputs)[0]
    net = create_network(model, base_config(lora_rank=4, lora_alpha=2, train_text_encoder=True))
    _randomize(net, seed=1)
    deltas = net.deltas()
    expected = {(c, t.module): deltas[t.kohya] for c, ts in net.targets.items() for t in ts}
    with torch.no_grad():
        ours_out = transformer(**inputs)[0]
    path = save_lora(tmp_path / "flux_lora.safetensors", net.state_dict(), {"ss_base_model_version": "flux1"},
                     precision="fp32")
    file_keys = len(read_lora(path)[0])
    net.remove()
    with torch.no_grad():
        assert torch.equal(transformer(**inputs)[0], base_out)

    pipe = FluxPipeline(transformer=transformer, vae=model.vae, text_encoder=model.text_encoders[0],
                        tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                        tokenizer_2=model.tokenizers[1], scheduler=model.noise_scheduler)
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert not records.messages  # no unexpected, unused or missing keys, for the transformer nor CLIP
    applied = {(c, name): m for c, root in (("unet", transformer), ("te1", model.text_encoders[0]))
               for name, m in root.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A}
    assert sorted(applied) == sorted(expected)  # every module of the file, and no other
    # 13 file modules of the blocks (20 diffusers modules), 18 of CLIP; three keys each
    assert (len(applied), file_keys) == (20 + 18, 3 * (13 + 18))
    for name, m in applied.items():
        delta = m.lora_B["ours"].weight @ m.lora_A["ours"].weight * m.scaling["ours"]
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs)[0], ours_out, rtol=1e-4, atol=1e-5)
        pipe.set_adapters(["ours"], [0.0])
        torch.testing.assert_close(transformer(**inputs)[0], base_out, rtol=0, atol=1e-6)


def test_the_file_merges_into_bfl_weights_as_forge_and_comfyui_map_kohya_keys():
    """Forge and ComfyUI hold FLUX.1 in BFL's layout and find a kohya module by its name: `lora_unet_` + the BFL
    weight's path with dots as underscores; the delta is up @ down * alpha / rank, rank = rows of down. Merged
    that way into the BFL state dict, the file gives exactly our per-module weights (their code, run outside the
    tests on this file: 44 of 44 modules applied, max difference 0)."""
    from lora_trainer.models.flux.bfl_names import bfl_to_diffusers, diffusers_to_bfl, out_features

    model = _bundle(num_double=2, num_single=2)
    transformer = model.transformer
    base = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    sizes = out_features(transformer)
    bfl = diffusers_to_bfl(base, 2, 2, transformer.config.guidance_embeds)
    by_stem = {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in bfl if k.endswith(".weight")}
    net = create_network(model, base_config(lora_rank=4, lora_alpha=2))
    _randomize(net, seed=2)
    sd = net.state_dict()
    merged = dict(bfl)
    for stem in {k.split(".")[0] for k in sd}:
        assert stem in by_stem, f"{stem} names no BFL weight"
        down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
        key = by_stem[stem]
        merged[key] = bfl[key] + up @ down * float(sd[f"{stem}.alpha"]) / down.shape[0]
    back = bfl_to_diffusers(merged, sizes)
    deltas = net.deltas()
    modules = {m: name for name, m in transformer.named_modules()}
    for stem, layer in net.layers.items():
        key = modules[layer] + ".weight"
        torch.testing.assert_close(back[key], base[key] + deltas[stem], rtol=1e-5, atol=1e-6)
    untouched = set(base) - {modules[layer] + ".weight" for layer in net.layers.values()}
    assert untouched and all(torch.equal(back[k], base[k]) for k in untouched)
