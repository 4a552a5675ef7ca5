"""Tiny Stable Diffusion models with random weights, built in code.

They have the real architecture (UNet, VAE, CLIP / OpenCLIP text encoders with the real 49408-token
tokenizer) at toy sizes, so the whole engine runs offline in seconds: the test suite and the `demo`
command use them. They are written the way people have models: an original-format single file with
its `.yaml` beside it (the WebUIs' convention), or a diffusers folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from . import ldm_names as names

TE_HIDDEN = 32
TE_LAYERS = 3  # SD2 uses all but the last
VOCAB = 49408


def tiny_original_config(family: str, v_prediction: bool = False) -> dict:
    """A complete original-format (LDM/SGM) yaml config for a tiny model of `family`.

    Complete enough for the WebUIs to build the model from it (targets, noise schedule, conditioning key),
    as they do for any checkpoint with a same-named .yaml beside it.
    """
    vae = {"embed_dim": 4, "monitor": "val/rec_loss",
           "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                        "dropout": 0.0},
           "lossconfig": {"target": "torch.nn.Identity"}}
    first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae}
    # Two ResNet blocks per level as in every real SD model: the WebUIs map LoRA names assuming it.
    unet = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 2,
            "channel_mult": [1, 2, 2], "transformer_depth": 1, "use_spatial_transformer": True,
            "use_checkpoint": False, "legacy": False}
    if family == "sd1":
        unet.update(attention_resolutions=[1, 2], num_heads=2, context_dim=TE_HIDDEN, use_linear_in_transformer=False)
    elif family == "sd2":
        unet.update(attention_resolutions=[1, 2], num_head_channels=16, context_dim=TE_HIDDEN,
                    use_linear_in_transformer=True)
    elif family == "sdxl":
        unet.update(attention_resolutions=[2, 4], num_head_channels=16, context_dim=2 * TE_HIDDEN,
                    use_linear_in_transformer=True, transformer_depth=[0, 1, 2], num_classes="sequential",
                    adm_in_channels=TE_HIDDEN + 6 * 256, num_res_blocks=1)
    else:
        raise ValueError(family)
    if family == "sdxl":
        scaling = "sgm.modules.diffusionmodules.denoiser_scaling." + ("VScaling" if v_prediction else "EpsScaling")
        sgm_vae = dict(vae, ddconfig=dict(vae["ddconfig"], attn_type="vanilla"))
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
            "scale_factor": 0.13025, "disable_first_stage_autocast": True,
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
                "num_idx": 1000,
                "scaling_config": {"target": scaling},
                "discretization_config": {
                    "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
            "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                                   "params": sgm_vae}}}}
    params = {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
              "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
              "scale_factor": 0.18215, "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": first_stage}
    if family == "sd1":
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    else:
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                       "params": {"freeze": True, "layer": "penultimate"}}
    if v_prediction:
        params["parameterization"] = "v"
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _text_encoder(projection: bool, openclip: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=TE_HIDDEN, intermediate_size=2 * TE_HIDDEN,
                         num_hidden_layers=TE_LAYERS, num_attention_heads=max(1, TE_HIDDEN // 64),
                         max_position_embeddings=77, hidden_act="gelu" if openclip else "quick_gelu",
                         projection_dim=TE_HIDDEN, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_ldm_state_dict(family: str, v_prediction: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """(original-format state dict, original config) of a tiny random model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .loader import _unet_config, _vae_config

    original = tiny_original_config(family, v_prediction)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_unet_config(family, original, {}))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_vae_config(family, original, {}))
    if family == "sdxl":
        encoders = [_text_encoder(False, False, seed + 2), _text_encoder(True, True, seed + 3)]
    else:
        encoders = [_text_encoder(family == "sd2", family == "sd2", seed + 2)]
    sd = ldm_state_dict_of(family, unet, vae, encoders)
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    return sd, original


def ldm_state_dict_of(family: str, unet, vae, text_encoders: list) -> dict:
    """The original-format (LDM/SGM) keys of diffusers / transformers modules, with their tensors (or, for
    modules on the meta device, their shapes)."""
    sd = {}
    sd.update(names.unet_to_ldm_state_dict(unet))
    sd.update(names.vae_to_ldm_state_dict(vae))

    def clip(te, prefix):
        return {prefix + k: v for k, v in names.canonical_clip_keys(te.state_dict()).items()
                if not k.endswith("position_ids")}

    if family == "sd1":
        sd.update(clip(text_encoders[0], names.SD1_TE_PREFIX))
    elif family == "sd2":
        sd.update(names.hf_to_openclip(names.canonical_clip_keys(text_encoders[0].state_dict()), names.SD2_TE_PREFIX))
    else:
        sd.update(clip(text_encoders[0], names.SDXL_TE1_PREFIX))
        sd.update(names.hf_to_openclip(names.canonical_clip_keys(text_encoders[1].state_dict()),
                                       names.SDXL_TE2_PREFIX))
    return sd


def write_tiny_single_file(path: Path, family: str, v_prediction: bool = False, seed: int = 0,
                           with_yaml: bool = True) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd, original = tiny_ldm_state_dict(family, v_prediction, seed)
    save_file(sd, str(path))
    _usual_mode(path)
    if with_yaml:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(original))
    return path


def _usual_mode(path: Path) -> None:
    """safetensors 0.8 creates files readable by their owner only; a model file people copy around gets the
    mode any new file gets here (0644 under the usual umask)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_diffusers_folder(model, folder: Path) -> Path:
    """Saves a loaded BaseModel as a diffusers folder (model_index.json, unet/, vae/, text_encoder*/ ...)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    suffixes = ["", "_2"]
    for i, (te, tok) in enumerate(zip(model.text_encoders, model.tokenizers)):
        te.save_pretrained(folder / f"text_encoder{suffixes[i]}")
        tok.save_pretrained(folder / f"tokenizer{suffixes[i]}")
    sched = dict(model.noise_scheduler.config)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {k: v for k, v in sched.items() if not k.startswith("_")} | {"_class_name": "DDPMScheduler"}, default=str))
    index = {"_class_name": "StableDiffusionXLPipeline" if model.family == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if model.family == "sdxl":
        index |= {"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def tiny_model_name(family: str, v_prediction: bool = False) -> str:
    return f"tiny-{family}{'-v' if v_prediction else ''}.safetensors"


def ensure_tiny_model(folder: Path, family: str = "sd1", v_prediction: bool = False) -> Path:
    """The demo's built-in base model, written once into `folder` (with its .yaml)."""
    path = Path(folder) / tiny_model_name(family, v_prediction)
    if not path.is_file() or not path.with_suffix(".yaml").is_file():
        write_tiny_single_file(path, family, v_prediction)
    return path


def build_tiny(family: str, v_prediction: bool = False, seed: int = 0, log_fn=None):
    """A tiny BaseModel in memory (shares the tensors of a freshly made state dict)."""
    from .loader import build_from_ldm_state_dict

    sd, original = tiny_ldm_state_dict(family, v_prediction, seed)
    return build_from_ldm_state_dict(sd, original_config=original, name=f"tiny-{family}",
                                     log_fn=log_fn or (lambda *_: None))

