"""FLUX.1 through the trainer: `python -m lora_trainer train` on a tiny Flux diffusers folder, the loss going down."""
from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from lora_trainer.cli import main
from lora_trainer.models.flux import tiny
from lora_trainer.network.kohya_file import read_lora

from conftest import base_config, make_images


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny.write_tiny_flux_folder(tmp_path_factory.mktemp("tiny-flux") / "tiny-flux")


def _write_yaml(path, **keys):
    import yaml

    path.write_text(yaml.safe_dump(keys))
    return path


def test_cli_trains_tiny_flux_and_writes_a_kohya_flux_lora(flux_dir, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = _write_yaml(tmp_path / "flux_style.yaml", base_model=str(flux_dir), train_data_dir=str(data),
                      output_dir=str(tmp_path / "out"), resolution=64, min_bucket_reso=64, max_bucket_reso=64,
                      bucket_reso_steps=32, batch_size=2, max_train_steps=2, lora_rank=4, learning_rate=1e-3,
                      log_with="none", save_steps=1, sample_prompts=["red square"], sample_steps=1,
                      sample_every_n_steps=0)
    assert main(["train", "--config", str(cfg)]) == 0
    capsys.readouterr()
    sd, meta = read_lora(tmp_path / "out" / "flux_style.safetensors")
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"  # Forge: a Flux card
    assert meta["modelspec.prediction_type"] == "flow"
    stems = {k.split(".")[0] for k in sd}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= stems
    assert any(torch.count_nonzero(v) for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert json.loads((tmp_path / "out" / "flux_style.json").read_text())["sd version"] == "Flux"
    assert list((tmp_path / "out" / "samples").glob("*.png"))


def test_training_lowers_the_flow_loss_on_a_fixed_batch(flux_dir, tmp_path):
    from lora_trainer.models.flux.loader import load_flux
    from lora_trainer.train.trainer import Trainer

    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(base_model=str(flux_dir), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=30, learning_rate=3e-3, lora_rank=8, resolution=64, max_bucket_reso=64)
    model = load_flux(str(flux_dir), log_fn=lambda *_: None)
    trainer = Trainer(cfg, model=model, keep_network=True)
    trainer.run()
    totals = fixed_batch_losses(cfg, model, trainer.network)
    assert totals[1.0] < 0.9 * totals[0.0], totals


def test_flux_is_detected_and_sd_options_that_do_not_apply_are_refused(flux_dir, tmp_path):
    from lora_trainer.config import ConfigError
    from lora_trainer.train.kinds import kind_for_config

    assert kind_for_config(base_config(base_model=str(flux_dir))).name == "flux"
    assert kind_for_config(base_config(base_model=str(tmp_path / "x.safetensors"))).name == "sd"
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        kind_for_config(base_config(base_model=str(flux_dir))).load(
            base_config(base_model=str(flux_dir), min_snr_gamma=5.0), print, None)


def test_single_file_flux_trains_and_continues_from_its_own_lora(flux_dir, tmp_path):
    """BFL transformer file + components folder; the written (fused) LoRA is read back to continue training."""
    from diffusers import FluxTransformer2DModel

    from lora_trainer.train.trainer import Trainer

    transformer = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer")
    path = tiny.write_bfl_transformer(transformer, tmp_path / "flux1-tiny.safetensors")
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    keys = dict(base_model=str(path), flux_components=str(flux_dir), train_data_dir=str(data), resolution=64,
                max_bucket_reso=64, max_train_steps=2, save_precision="fp32", timestep_sampling="flux_shift")
    first = Trainer(base_config(output_dir=str(tmp_path / "a"), **keys)).run()
    sd, _ = read_lora(first.lora_path)
    assert meta_of(first.lora_path)["ss_sd_model_name"] == "flux1-tiny.safetensors"
    # the fused file reads back into per-module LoRAs exactly
    from lora_trainer.models.flux.loader import load_flux
    from lora_trainer.network.base import create_network

    net = create_network(load_flux(str(path), str(flux_dir), log_fn=lambda *_: None), base_config(**keys))
    net.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items())
    cont = Trainer(base_config(output_dir=str(tmp_path / "b"), init_lora_weights=str(first.lora_path), **keys)).run()
    assert cont.status == "finished"


def meta_of(path):
    return read_lora(path)[1]


def test_t5xxl_max_token_length_sets_the_text_sequence_and_is_recorded(flux_dir, tmp_path):
    """Captions reach the transformer as 64 T5 tokens (the dev default is 512), and the file says so."""
    from lora_trainer.config import ConfigError
    from lora_trainer.models.flux.loader import load_flux
    from lora_trainer.train.trainer import Trainer

    for bad in (0, 513):
        with pytest.raises(ConfigError, match="t5xxl_max_token_length"):
            base_config(t5xxl_max_token_length=bad)
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    model = load_flux(str(flux_dir), log_fn=lambda *_: None)
    assert model.t5_length == 512  # dev, as FluxPipeline encodes
    seen = []
    model.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["encoder_hidden_states"].shape)), with_kwargs=True)
    cfg = base_config(base_model=str(flux_dir), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=1, resolution=64, max_bucket_reso=64, t5xxl_max_token_length=64)
    result = Trainer(cfg, model=model).run()
    assert seen and all(shape == (2, 64, model.transformer.config.joint_attention_dim) for shape in seen), seen
    meta = meta_of(result.lora_path)
    assert meta["ss_t5xxl_max_token_length"] == "64"
    assert meta["ss_timestep_sampling"] == "sigmoid" and meta["ss_guidance_scale"] == "1.0"


def fixed_batch_losses(cfg, model, network, autocast=None) -> dict[float, float]:
    """The flow loss summed over six draws of one fixed batch, without (0.0) and with (1.0) the trained LoRA."""
    from lora_trainer.data import build_dataset
    from lora_trainer.models.flux import objective as flow
    from lora_trainer.models.flux.model import encode_flux_prompts

    ds = build_dataset(cfg, log=None)
    pixels = torch.stack([ds.load_sample(i, 0, 0)["pixels"] for i in range(2)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = flow.to_latents(model.vae.encode(pixels).latent_dist.mean, model.vae.config)
        seq, pooled = encode_flux_prompts(model, [ds.caption_for(i, 0, 0) for i in range(2)])
        noise = [torch.randn(latents.shape, generator=g) for _ in range(6)]
        sigmas = [flow.sample_sigmas(2, "sigmoid", generator=g) for _ in range(6)]
        totals = {}
        for weight in (0.0, 1.0):
            with network.multiplier(weight), (torch.autocast("cpu", autocast) if autocast else nullcontext()):
                totals[weight] = sum(torch.nn.functional.mse_loss(*[t.float() for t in flow.predict(
                    model.transformer, latents, n, s, seq, pooled)]).item() for n, s in zip(noise, sigmas))
    return totals
