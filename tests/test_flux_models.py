"""FLUX.1 tiny models, BFL <-> diffusers layout, loading from a folder and from a single file (all offline)."""
from __future__ import annotations

import json

import pytest
import torch

from lora_trainer.models.flux import bfl_names, tiny
from lora_trainer.models.flux.loader import (ModelLoadError, detect_flux, load_flux, transformer_from_bfl)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny.write_tiny_flux_folder(tmp_path_factory.mktemp("tiny-flux") / "flux", num_double=2, num_single=2)


def test_tiny_flux_folder_loads_in_flux_pipeline_offline(flux_dir):
    from diffusers import FluxPipeline

    index = json.loads((flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    from lora_trainer.models.flux.model import encode_flux_prompts

    # low_cpu_mem_usage=False: older diffusers ask transformers for it, which then wants accelerate
    pipe = FluxPipeline.from_pretrained(str(flux_dir), local_files_only=True, low_cpu_mem_usage=False)
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (tiny.VAE_SHIFT, tiny.VAE_SCALE)
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers) == (2, 2)
    model = load_flux(str(flux_dir), log_fn=lambda *_: None)
    seq, pooled = encode_flux_prompts(model, ["a red ball"], max_length=16)
    # embeddings given: transformers 4.30's tokenizers lack what diffusers 0.31's prompt path reads
    images = pipe(prompt_embeds=seq, pooled_prompt_embeds=pooled, num_inference_steps=1, height=32, width=32,
                  output_type="np", guidance_scale=3.5).images
    assert images.shape == (1, 32, 32, 3)


def test_bfl_layout_names_and_round_trip():
    t = tiny.tiny_transformer(num_double=2, num_single=2)
    cfg = t.config
    sd = bfl_names.diffusers_to_bfl(t.state_dict(), 2, 2, True)
    width = cfg.num_attention_heads * cfg.attention_head_dim
    assert sd["double_blocks.1.img_attn.qkv.weight"].shape == (3 * width, width)
    assert sd["single_blocks.0.linear1.weight"].shape == (3 * width + 4 * width, width)
    assert sd["single_blocks.1.linear2.weight"].shape == (width, width + 4 * width)
    for key in ("double_blocks.0.txt_mod.lin.weight", "double_blocks.0.img_mlp.2.bias", "single_blocks.1.modulation.lin.bias",
                "double_blocks.1.txt_attn.norm.key_norm.scale", "guidance_in.out_layer.weight",
                "final_layer.adaLN_modulation.1.weight", "time_in.in_layer.bias", "vector_in.out_layer.weight"):
        assert key in sd
    # per double block two q,k,v triples become one each, per single block q,k,v,mlp one; weights and biases
    assert len(sd) == len(t.state_dict()) - 2 * (2 * 2 * 2) - 2 * (3 * 2)
    back = bfl_names.bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in sd.items()},
                                      bfl_names.out_features(t))
    assert back.keys() == t.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())


def test_bfl_layout_agrees_with_diffusers_own_converter_at_real_width():
    """diffusers' single-file converter assumes Flux's real width (3072): compare on one real-width block pair."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        t = tiny.tiny_transformer(heads=24, head_dim=128, num_double=1, num_single=1)
    sd = {k: torch.empty(v.shape, device="meta") for k, v in t.state_dict().items()}
    bfl = bfl_names.diffusers_to_bfl(sd, 1, 1, True)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_names.bfl_to_diffusers(dict(bfl), bfl_names.out_features(t))
    assert theirs.keys() == ours.keys() == sd.keys()
    assert all(theirs[k].shape == ours[k].shape for k in ours)


def test_single_file_detected_and_loaded_with_components_beside_it(flux_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer")
    path = tiny.write_bfl_transformer(reference, tmp_path / "flux1-tiny.safetensors", prefix="model.diffusion_model.")
    assert detect_flux(path) and detect_flux(flux_dir)
    with pytest.raises(ModelLoadError, match=r"vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, "
                                             r"scheduler/.*flux_components"):
        load_flux(str(path))
    model = load_flux(str(path), components=str(flux_dir), log_fn=lambda *_: None)
    assert model.variant == "dev" and model.source == "single-file"
    for key in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                "pooled_projection_dim", "guidance_embeds", "in_channels"):
        assert model.transformer.config[key] == reference.config[key], key
    assert tuple(model.transformer.config.axes_dims_rope) == tuple(reference.config.axes_dims_rope)
    with torch.no_grad():
        inputs = tiny.transformer_inputs(reference)
        assert torch.equal(model.transformer(**inputs)[0], reference(**inputs)[0])
    # the components' folder may also be a same-named folder beside the file
    import shutil

    shutil.copytree(flux_dir, tmp_path / "flux1-tiny", ignore=shutil.ignore_patterns("transformer"))
    assert load_flux(str(path), log_fn=lambda *_: None).path == str(path)


def test_folder_loads_as_flux_model(flux_dir):
    from lora_trainer.models.flux.model import encode_flux_prompts

    model = load_flux(str(flux_dir), log_fn=lambda *_: None)
    assert model.family == "flux" and model.variant == "dev" and model.base_model_version == "flux1"
    assert not any(p.requires_grad for p in model.transformer.parameters())
    seq, pooled = encode_flux_prompts(model, ["a red ball", "x"], max_length=16)
    assert seq.shape == (2, 16, tiny.TEXT_DIM) and pooled.shape == (2, tiny.TEXT_DIM)


def test_schnell_has_no_guidance_and_sd_files_are_not_flux(tmp_path):
    t = tiny.tiny_transformer(guidance=False)
    path = tiny.write_bfl_transformer(t, tmp_path / "schnell.safetensors")
    sd = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path))
    assert not any(k.startswith("guidance_in") for k in sd)
    assert transformer_from_bfl(sd).config.guidance_embeds is False
    from lora_trainer.models.tiny import write_tiny_single_file

    assert not detect_flux(write_tiny_single_file(tmp_path / "sd1.safetensors", "sd1", with_yaml=False))
    assert not detect_flux(tmp_path / "missing.safetensors")
