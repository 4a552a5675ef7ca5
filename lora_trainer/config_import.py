"""Configs people already have: kohya sd-scripts' and lora-scripts' (SD-Trainer) TOML files, read as they are.

- kohya `--config_file`: argument names as keys, flat or grouped in any [section]s;
- lora-scripts: `[model] [dataset] [additional_network] [optimizer] [training] [sample_prompt] [saving] [others]`
  sections (older GUI) or flat keys (newer autosaves);
- kohya `--dataset_config` (also named by a `dataset_config` key): `[general]`, `[[datasets]]`,
  `[[datasets.subsets]]` with image_dir / num_repeats / is_reg.

Every key we support is mapped to ours; every key we do not is named with what to use instead (a note when
ignoring it changes nothing that matters, an error when it would). Only stdlib is imported here.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Union

from .config import ALIASES, ConfigError, TrainConfig, field_names, from_dict

# foreign key -> our key (beyond config.ALIASES, which YAML accepts too)
MAPPED = {
    "prior_loss_weight": "reg_weight",
    "max_data_loader_n_workers": "dataloader_workers",
    "save_last_n_epochs": "save_last_n_checkpoints",
    "save_last_n_steps_state": "save_last_n_checkpoints",
    "lr_restart_cycles": "lr_scheduler_num_cycles",
    "resume_from_checkpoint": "resume_from_checkpoint",
    "in_json": "metadata_path",
}

# keys that need no counterpart here: the note says why
IGNORED = {
    "xformers": "attention uses PyTorch's scaled-dot-product kernels (as fast, no xformers needed)",
    "sdpa": "PyTorch's scaled-dot-product attention is always used",
    "mem_eff_attn": "PyTorch's scaled-dot-product attention is always used",
    "lowram": "weights are loaded tensor by tensor already",
    "save_model_as": "LoRAs are always saved as .safetensors",
    "save_state": "every checkpoint (save_steps / save_every_n_epochs) is resumable",
    "save_state_on_train_end": "the final LoRA plus any checkpoint is what a resume needs",
    "log_prefix": "TensorBoard runs are named <output_name>-<time>",
    "persistent_data_loader_workers": "workers are kept for the whole run",
    "network_module": None,  # checked below: networks.lora is ours; others are named
    "model_train_type": None,  # checked below
    "cache_text_encoder_outputs": "a frozen text encoder's outputs are always cached",
    "no_half_vae": "the VAE always runs in float32",
    "sample_sampler": "samples use the Euler sampler",
    "enable_preview": "set sample_prompts to render samples",
    "v2": "the family (SD1 / SD2 / SDXL) is detected from the weights (model_family: sd2 to insist)",
    "sdxl": "the family is detected from the weights (model_family: sdxl to insist)",
    "network_train_unet_only": None,  # mapped below
    "network_train_text_encoder_only": None,  # mapped below
    "network_args": None,  # mapped below
    "sample_prompt_file": None,  # mapped below
    "dataset_config": None,  # read below
    "class_tokens": "captions come from caption files or metadata.csv; put a trigger word in caption_prefix",
    "log_with": None,  # passes through (tensorboard / none)
    "console_log_simple": "output is plain lines when not on a terminal",
    "gpu_ids": "pick the device with device: cuda:N",
    "highvram": "the whole model stays on the device while training",
    "vae_batch_size": "latents are encoded in batches per bucket",
    "model_prediction_type": "FLUX.1 trains on the raw velocity (kohya's model_prediction_type raw)",
    "apply_t5_attn_mask": "T5 runs without an attention mask, as FluxPipeline encodes",
}

# keys whose effect we cannot give: an error, with what to use instead
UNSUPPORTED = {
    "full_fp16": "full fp16 training is not supported; use mixed_precision: fp16 (LoRA weights stay fp32)",
    "full_bf16": "full bf16 training is not supported; use mixed_precision: bf16 (LoRA weights stay fp32)",
    "fp8_base_unet": "use fp8_base (the FLUX.1 transformer in fp8; the text encoders are frozen and released)",
    "ae": "give FLUX.1's VAE, text encoders and tokenizers as a diffusers-layout folder in flux_components",
    "clip_l": "give FLUX.1's VAE, text encoders and tokenizers as a diffusers-layout folder in flux_components",
    "t5xxl": "give FLUX.1's VAE, text encoders and tokenizers as a diffusers-layout folder in flux_components",
    "save_n_epoch_ratio": "use save_every_n_epochs",
    "multires_noise_iterations": "use noise_offset",
    "multires_noise_discount": "use noise_offset",
    "ip_noise_gamma": "not supported",
    "scale_v_pred_loss_like_noise_pred": "not supported",
    "masked_loss": "not supported",
    "color_aug": "not supported (flip_aug and random_crop are)",
    "face_crop_aug_range": "not supported (random_crop is)",
    "sample_every_n_epochs": "use sample_every_n_steps",
    "save_every_n_steps_state": "use save_steps",
}

# lora-scripts' `model_train_type` values we train
TRAIN_TYPES = {"sd-lora": "sd1", "sdxl-lora": "sdxl", "sd-dreambooth": None, "sdxl-finetune": None}
DATASET_GENERAL = {"shuffle_caption", "caption_extension", "keep_tokens", "enable_bucket", "min_bucket_reso",
                   "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "flip_aug", "random_crop",
                   "caption_dropout_rate", "caption_tag_dropout_rate", "resolution", "batch_size", "color_aug",
                   "face_crop_aug_range", "num_repeats", "caption_prefix", "caption_suffix"}


def read_toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def flatten(data: dict, source: str) -> dict:
    """Keys of [sections] (one level, as kohya and lora-scripts group them) lifted to the top."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("optimizer_args",):
            for sub, v in value.items():
                if sub in flat:
                    raise ConfigError(f"{source}: {sub!r} is set in two sections")
                flat[sub] = v
        else:
            flat[key] = value
    return flat


def translate(flat: dict, source: str, base_dir: Path) -> tuple[dict, list[str]]:
    """(our config keys, notes) for a flat mapping of kohya / lora-scripts keys."""
    ours = set(field_names())
    out: dict[str, Any] = {}
    notes: list[str] = []
    errors: list[str] = []
    for key, value in flat.items():
        if key in UNSUPPORTED:
            if value not in (False, None, "", 0):  # switched off, it asks for nothing we lack
                errors.append(f"{key}: {UNSUPPORTED[key]}")
        elif key == "network_module":
            if str(value) not in ("networks.lora", "networks.lora_flux", "networks.dylora", "lycoris.kohya", ""):
                errors.append(f"network_module {value!r}: kohya's networks.lora (LoRA, LoCon with conv_dim in "
                              f"network_args, DoRA with dora_wd=True) and lycoris.kohya (algo=lora, locon, loha, "
                              f"lokr) are trained here")
        elif key == "model_train_type":
            if str(value) not in TRAIN_TYPES or TRAIN_TYPES[str(value)] is None:
                errors.append(f"model_train_type {value!r}: this trainer trains LoRAs (sd-lora, sdxl-lora)")
        elif key == "network_train_unet_only":
            if value:
                out["train_text_encoder"] = False
        elif key == "network_train_text_encoder_only":
            if value:
                out["train_unet"], out["train_text_encoder"] = False, True
        elif key == "network_args":
            out.update(_network_args(value, notes))
        elif key == "sample_prompt_file" or key == "sample_prompts":
            out["sample_prompts"] = str(_relative(value, base_dir)) if isinstance(value, str) else value
        elif key == "dataset_config":
            dataset, more = read_dataset_config(_relative(value, base_dir))
            out.update(dataset)
            notes += more
        elif key in IGNORED and IGNORED[key] is not None:
            if value not in (False, None, "", 0):
                notes.append(f"{key} ignored: {IGNORED[key]}")
        elif key in MAPPED:
            out[MAPPED[key]] = value
        elif key in ours or key in ALIASES:
            out[key] = value
        elif key == "log_with":
            out["log_with"] = value
        else:
            close = difflib.get_close_matches(key, sorted(ours | set(ALIASES) | set(MAPPED)), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{key}: not a setting this trainer knows{hint}")
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return out, notes


# LyCORIS's network_args and the keys they set here.
_LYCORIS_ARGS = {"factor": "lokr_factor", "decompose_both": "decompose_both", "full_matrix": "lokr_full_rank",
                 "use_tucker": "use_tucker", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout",
                 "dropout": "lora_dropout"}


def _network_args(value, notes: list[str]) -> dict:
    items = value if isinstance(value, list) else [value]
    out: dict[str, Any] = {}
    for item in items:
        name, _, arg = str(item).partition("=")
        name, arg = name.strip(), arg.strip()
        if name == "conv_dim":
            out["conv_lora"], out["conv_rank"] = True, int(arg)
        elif name == "conv_alpha":
            out["conv_alpha"] = float(arg)
        elif name == "dora_wd":
            out["use_dora"] = arg.lower() in ("true", "1", "yes")
        elif name == "algo" and arg in ("lora", "locon", "loha", "lokr"):
            out["network_type"] = arg
        elif name in _LYCORIS_ARGS:
            out[_LYCORIS_ARGS[name]] = arg
        else:
            raise ConfigError(f"network_args {item!r}: not supported (conv_dim, conv_alpha, dora_wd, algo=lora|locon|"
                              f"loha|lokr, {', '.join(_LYCORIS_ARGS)} are)")
    return out


def _relative(value: str, base_dir: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or path.exists() else base_dir / path


def read_dataset_config(path: Path) -> tuple[dict, list[str]]:
    """kohya's dataset config: one training subset (plus optionally one regularization subset)."""
    data = read_toml(Path(path))
    source = str(path)
    out: dict[str, Any] = {}
    general = data.get("general", {}) or {}
    datasets = data.get("datasets", []) or []
    if len(datasets) != 1:
        raise ConfigError(f"{source}: {len(datasets)} [[datasets]]; this trainer takes one dataset (a folder, "
                          f"optionally with N_name repeat sub-folders and a reg_data_dir)")
    ds = datasets[0]
    for scope in (general, ds):
        for key, value in scope.items():
            if key == "subsets":
                continue
            if key not in DATASET_GENERAL:
                raise ConfigError(f"{source}: {key} in the dataset config is not supported here")
            if key in UNSUPPORTED:
                raise ConfigError(f"{source}: {key}: {UNSUPPORTED[key]}")
            out["batch_size" if key == "batch_size" else key] = value
    train = [s for s in ds.get("subsets", []) if not s.get("is_reg")]
    reg = [s for s in ds.get("subsets", []) if s.get("is_reg")]
    if len(train) != 1 or len(reg) > 1:
        raise ConfigError(f"{source}: {len(train)} training and {len(reg)} regularization subsets; this trainer "
                          f"takes one of each at most. Put the subsets' folders as N_name sub-folders of one "
                          f"train_data_dir (N = repeats) instead")
    notes: list[str] = []
    for subset, key in ((train[0], "train_data_dir"), *(((reg[0], "reg_data_dir"),) if reg else ())):
        for k, v in subset.items():
            if k == "image_dir":
                out[key] = str(_relative(v, Path(path).parent))
            elif k == "num_repeats" and key == "train_data_dir":
                out["num_repeats"] = v
            elif k == "metadata_file" and key == "train_data_dir":
                out["metadata_path"] = str(_relative(v, Path(path).parent))
            elif k in ("is_reg",):
                continue
            elif k in DATASET_GENERAL and key == "train_data_dir":
                out[k] = v
            elif k == "class_tokens":
                notes.append(f"class_tokens ignored: {IGNORED['class_tokens']}")
            else:
                raise ConfigError(f"{source}: subset key {k} is not supported here")
    return out, notes


def load_toml_config(path: Union[str, Path], overrides: dict = None) -> tuple[TrainConfig, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    flat = flatten(read_toml(path), str(path))
    data, notes = translate(flat, str(path), path.parent)
    data = {**data, **(overrides or {})}
    if "output_name" not in data:
        data["output_name"] = path.stem
    return from_dict(data, source=str(path)), notes
