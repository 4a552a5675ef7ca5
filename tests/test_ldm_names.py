"""Our original-layout names checked against diffusers' own LDM -> diffusers converter."""
import torch

from lora_trainer.models import ldm_names as names
from lora_trainer.models.tiny import tiny_ldm_state_dict, tiny_original_config


def _roundtrip(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from lora_trainer.models.loader import _unet_config, _vae_config

    sd, original = tiny_ldm_state_dict(family)
    unet_cfg = _unet_config(family, original, sd)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**_vae_config(family, original, sd))
    return sd, unet, vae, convert_ldm_unet_checkpoint(sd, unet.config), convert_ldm_vae_checkpoint(sd, vae.config)


def test_unet_and_vae_names_roundtrip_through_diffusers_converter():
    for family in ("sd1", "sdxl"):
        sd, unet, vae, unet_sd, vae_sd = _roundtrip(family)
        # diffusers' converter must find every tensor we wrote, under the names the modules expect
        assert set(unet_sd) == set(unet.state_dict()), family
        assert set(vae_sd) == set(vae.state_dict()), family
        ours = names.unet_to_ldm_state_dict(unet)
        assert set(ours) == {k for k in sd if k.startswith(names.UNET_PREFIX)}
        # and the values come back where they started
        unet.load_state_dict(unet_sd)
        back = names.unet_to_ldm_state_dict(unet)
        for k, v in back.items():
            assert torch.equal(v, sd[k]), k


def test_sdxl_kohya_style_block_numbers():
    cfg = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    m = names.unet_name_mapper(cfg)
    # facts from kohya-format.md (full-size SDXL)
    assert m("down_blocks.1.attentions.0") == "input_blocks.4.1"
    assert m("mid_block.attentions.0") == "middle_block.1"
    assert m("up_blocks.0.attentions.0") == "output_blocks.0.1"
    assert m("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert m("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert m("up_blocks.2.resnets.1.conv1") == "output_blocks.7.0.in_layers.2"
    assert m("time_embedding.linear_1") == "time_embed.0"


def test_openclip_mapping_is_views_and_inverts():
    sd, _ = tiny_ldm_state_dict("sd2")
    hf = names.openclip_to_hf(sd, names.SD2_TE_PREFIX)
    storages = {v.untyped_storage().data_ptr() for v in sd.values()}
    assert all(v.untyped_storage().data_ptr() in storages for v in hf.values())
    back = names.hf_to_openclip(hf, names.SD2_TE_PREFIX)
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    assert set(back) == {k for k in sd if k.startswith(names.SD2_TE_PREFIX)}


def test_tiny_config_is_an_original_yaml_layout():
    cfg = tiny_original_config("sdxl", v_prediction=True)
    assert "network_config" in cfg["model"]["params"]
    assert "VScaling" in cfg["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"]
