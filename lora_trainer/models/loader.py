"""Loaders: single-file checkpoint, diffusers folder, hub id, or an in-memory original-format state dict.

The state-dict path builds every module on the meta device and loads with `assign=True`, so the
diffusers modules hold the very tensors of the given state dict (views, not copies). That is how the
WebUI tab trains on the checkpoint the host already has in memory.
"""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch

from ..fsutil import file_sha256
from . import ldm_names as names
from .base import BaseModel
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


def transformers_dtype_kwarg() -> str:
    """transformers 5 renamed from_pretrained's torch_dtype to dtype (4.56 accepts both)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _config(name: str) -> dict:
    return json.loads(resources.files("lora_trainer.models").joinpath("configs", name).read_text())


# --- family detection -------------------------------------------------------------------------------
def normalize_ldm_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accepts the WebUIs' live names (`cond_stage_model.wrapped.*`) and older SD1 text-encoder names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("cond_stage_model.wrapped."):
            k = "cond_stage_model." + k[len("cond_stage_model.wrapped."):]
        if k.startswith("conditioner.embedders.0.wrapped."):
            k = "conditioner.embedders.0." + k[len("conditioner.embedders.0.wrapped."):]
        if k.startswith("conditioner.embedders.1.wrapped."):
            k = "conditioner.embedders.1." + k[len("conditioner.embedders.1.wrapped."):]
        if k.startswith(names.SD1_TE_PREFIX) and not k.startswith((names.SD1_TE_PREFIX + "text_model.",
                                                                   names.SD1_TE_PREFIX + "text_projection.")):
            k = names.SD1_TE_PREFIX + "text_model." + k[len(names.SD1_TE_PREFIX):]
        out[k] = v
    return out


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    keys = sd.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(names.UNET_PREFIX):
        raise ModelLoadError("this file has no UNet weights (model.diffusion_model.*): it is not a Stable Diffusion "
                             "checkpoint (a LoRA, VAE or embedding perhaps?)")
    if (has(names.SDXL_TE2_PREFIX) or has(names.SDXL_TE2_HF_PREFIX)) and has(names.SDXL_TE1_PREFIX):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ModelLoadError("this looks like the SDXL refiner (one OpenCLIP text encoder); LoRA training supports "
                             "SD1, SD2 and the SDXL base model")
    if has(names.SD2_TE_PREFIX):
        return "sd2"
    if has(names.SD1_TE_PREFIX):
        # CLIP ViT-L (SD1) is 768 wide; a 1024-wide encoder here is SD2's OpenCLIP ViT-H in transformers' layout
        emb = sd.get(names.SD1_TE_PREFIX + "text_model.embeddings.token_embedding.weight")
        return "sd2" if emb is not None and emb.shape[1] == 1024 else "sd1"
    if any(k.startswith("model.diffusion_model.joint_blocks") or "double_blocks" in k for k in keys):
        raise ModelLoadError("this is an SD3 or FLUX.1 checkpoint: SD3 is not supported; FLUX.1 trains with "
                             "model_family: auto or flux (not through this SD loader)")
    raise ModelLoadError("cannot tell the model family: no known text encoder weights were found "
                         "(expected cond_stage_model.* or conditioner.embedders.*)")


# --- reading files ----------------------------------------------------------------------------------
# Keys that nothing here uses and that can be as large as the model: an EMA copy of the UNet's weights.
UNUSED_PREFIXES = ("model_ema.",)

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

DtypeFor = Callable[[str], Optional[torch.dtype]]


def read_checkpoint(path: Path, dtype_for: Optional[DtypeFor] = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file. `dtype_for(key)` may name the dtype a floating-point tensor should
    have; it is converted as soon as it is read, so the file's tensors and their converted copies are never
    all in memory at once (the peak is the converted model plus one tensor). An EMA copy (model_ema.*), which
    nothing uses, is not kept."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return _read_safetensors(path, dtype_for)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{path.name} is not a complete .safetensors file ({type(e).__name__}: truncated or "
                                 f"damaged); download or copy it again") from None
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            from ..safeload import weights_only_load

            data = weights_only_load(path)  # never a plain pickle load
        except Exception as e:
            raise ModelLoadError(f"{path.name} cannot be loaded safely (it contains pickled code, or is damaged): "
                                 f"{str(e).splitlines()[0]}. Convert it to .safetensors with a tool you trust.") from None
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        del data
        out = {}
        for key in list(tensors):  # pop as we go: each source tensor is released once converted
            value = tensors.pop(key)
            if not key.startswith(UNUSED_PREFIXES):
                out[key] = _convert(value, dtype_for(key) if dtype_for else None)
        return out
    raise ModelLoadError(f"{path.name}: unsupported checkpoint type {suffix!r} (use .safetensors or .ckpt)")


def _convert(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _read_safetensors(path: Path, dtype_for: Optional[DtypeFor]) -> dict[str, torch.Tensor]:
    """Reads the file tensor by tensor with plain reads (no memory map whose pages would count as the process's
    memory until the last tensor is released). A tensor that keeps its dtype is read straight into its own
    memory; one that is converted is read into one scratch buffer, reused for every tensor, and copied into its
    own memory in the new dtype (a fresh buffer per source tensor, freed right after, leaves the allocator's heap
    holding about one more copy of the model: measured 1.95x instead of 1.04x)."""
    import math

    size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("no header")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, 100 * 2 ** 20):
            raise ValueError("header length beyond the file")
        header = json.loads(fh.read(header_len))
        start_of_data = 8 + header_len
        plan = []
        for key, info in header.items():
            if key == "__metadata__" or key.startswith(UNUSED_PREFIXES):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelLoadError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which this loader does "
                                     f"not read")
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            itemsize = torch.empty((), dtype=dtype).element_size()  # dtype.itemsize needs torch 2.1
            if start_of_data + end > size or end - begin != math.prod(shape) * itemsize:
                raise ValueError(f"tensor {key} lies beyond the end of the file")
            target = dtype_for(key) if dtype_for else None
            if target is None or not dtype.is_floating_point or target == dtype:
                target = dtype
            plan.append((begin, end, key, shape, dtype, target))
        plan.sort(key=lambda entry: entry[0])  # in file order: sequential reads
        scratch_size = max((end - begin for begin, end, _, _, dtype, target in plan if target != dtype), default=0)
        scratch = torch.empty(scratch_size, dtype=torch.uint8)
        for begin, end, key, shape, dtype, target in plan:
            nbytes = end - begin
            tensor = torch.empty(shape, dtype=target)
            if not nbytes:
                out[key] = tensor
                continue
            into = scratch[:nbytes] if target != dtype else tensor.view(-1).view(torch.uint8)
            fh.seek(start_of_data + begin)
            if fh.readinto(memoryview(into.numpy())) != nbytes:
                raise ValueError(f"tensor {key} is cut short")
            if target != dtype:
                tensor.copy_(into.view(dtype).view(shape))
            out[key] = tensor
        del scratch
    return out


def _read_yaml_beside(path: Path) -> Optional[dict]:
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelLoadError(f"{yaml_path.name} beside the checkpoint is not a readable YAML config "
                             f"({type(e).__name__}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{yaml_path.name} beside the checkpoint is not a model config (no mapping at the top)")
    return data


# --- building modules that share the state dict's tensors ---------------------------------------------
@contextmanager
def _on_meta():
    """Parameters created on the meta device (no memory); buffers stay real (position ids etc.)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


class ArchitectureMismatch(ModelLoadError):
    """The weights have other shapes than the architecture they were read as (a non-standard checkpoint)."""


def _assign(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    shapes_only = all(t.is_meta for t in sd.values())  # a shapes-only build (models.meta) stays on meta
    try:
        missing, unexpected = module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # torch lists every mismatched tensor: one line instead of a thousand
        mismatches = str(e).count("size mismatch for")
        if not mismatches:
            raise
        own = module.state_dict()
        first = next((k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)), None)
        example = (f" (e.g. {first}: {tuple(sd[first].shape)} in the file, {tuple(own[first].shape)} expected)"
                   if first else "")
        raise ArchitectureMismatch(f"{what}: {mismatches} weight(s) have other shapes than the standard "
                                   f"architecture{example}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(f"{what}: the weights do not fit the expected architecture "
                             f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover and not shapes_only:
        raise ModelLoadError(f"{what}: parameters left without weights: {leftover[:5]}")
    return module


def _clip_config_from_weights(sd: dict[str, torch.Tensor], openclip_prefix: Optional[str], hf_prefix: Optional[str],
                              num_layers_drop: int = 0, projection: bool = False, act: Optional[str] = None):
    """Text-encoder sizes read from the tensors' shapes (a yaml never gives them)."""
    from transformers import CLIPTextConfig

    if openclip_prefix:
        emb = sd[openclip_prefix + "token_embedding.weight"]
        pos = sd[openclip_prefix + "positional_embedding"]
        layers = 1 + max(int(k[len(openclip_prefix):].split(".")[2]) for k in sd
                         if k.startswith(openclip_prefix + "transformer.resblocks."))
        inter = sd[openclip_prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
        proj_key = openclip_prefix + "text_projection"
        proj_dim = sd[proj_key].shape[1] if proj_key in sd else emb.shape[1]
    else:
        p = hf_prefix + "text_model."
        emb = sd[p + "embeddings.token_embedding.weight"]
        pos = sd[p + "embeddings.position_embedding.weight"]
        layers = 1 + max(int(k[len(p):].split(".")[2]) for k in sd if k.startswith(p + "encoder.layers."))
        inter = sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        act = act or "quick_gelu"  # OpenAI's CLIP; OpenCLIP's encoders use gelu
        proj_key = hf_prefix + "text_projection.weight"
        proj_dim = sd[proj_key].shape[0] if proj_key in sd else emb.shape[1]
    hidden = emb.shape[1]
    return CLIPTextConfig(vocab_size=emb.shape[0], hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers - num_layers_drop, num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=pos.shape[0], hidden_act=act, projection_dim=proj_dim,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _hf_text_encoder(sd: dict[str, torch.Tensor], prefix: str, num_layers: Optional[int]) -> dict[str, torch.Tensor]:
    """A text encoder already in transformers' layout, prefix stripped; layers from `num_layers` on left out."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.", key)
        if m and num_layers is not None and int(m[1]) >= num_layers:
            continue
        out[key] = value
    return out


def _text_encoder(config, weights: dict[str, torch.Tensor], projection: bool, what: str):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _on_meta():
        model = cls(config)
    return _assign(model, names.clip_keys_for(model, weights), what)


def _unet_config(family: str, original_config: Optional[dict], sd: dict[str, torch.Tensor]) -> dict:
    if original_config is not None:
        from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

        cfg = create_unet_diffusers_config_from_ldm(original_config, sd)
        cfg.pop("upcast_attention", None)
        if family == "sdxl" and cfg.get("class_embed_type") == "projection":
            # diffusers recognises SDXL's size conditioning only at full size (context 2048/1280)
            cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
        return {k: v for k, v in cfg.items() if v is not None or k in ("cross_attention_dim",)}
    return _config(f"{family}_unet.json")


def _vae_config(family: str, original_config: Optional[dict], sd: dict[str, torch.Tensor]) -> dict:
    if original_config is not None:
        from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

        return create_vae_diffusers_config_from_ldm(original_config, sd)
    return _config("sdxl_vae.json" if family == "sdxl" else "sd_vae.json")


def _noise_scheduler(v_prediction: bool, folder: Optional[Path] = None):
    from diffusers import DDPMScheduler

    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        keep = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                    "steps_offset", "timestep_spacing") if k in cfg}
    else:
        keep = _config("scheduler.json")
    return DDPMScheduler(**keep, prediction_type="v_prediction" if v_prediction else "epsilon")


def _v_from_original_config(original_config: Optional[dict]) -> Optional[bool]:
    if not original_config:
        return None
    params = original_config.get("model", {}).get("params", {})
    if "parameterization" in params:
        return params["parameterization"] == "v"
    denoiser = params.get("denoiser_config", {}).get("params", {})
    scaling = str(denoiser.get("scaling_config", {}).get("target", ""))
    if scaling:
        return "VScaling" in scaling
    return False


def build_from_ldm_state_dict(sd: dict[str, torch.Tensor], *, family: str = "auto",
                              v_parameterization="auto", original_config: Optional[dict] = None,
                              name: str = "model", path: Optional[str] = None, source: str = "state-dict",
                              hash_fn: Optional[Callable[[], str]] = None,
                              tokenizer_folder: Optional[str] = None, log_fn=print) -> BaseModel:
    """diffusers modules on the tensors of an original-format (LDM/SGM) state dict: nothing is copied."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = normalize_ldm_keys(sd)
    detected = detect_family(sd)
    if family == "sd2" and detected == "sd1":
        detected = "sd2"  # SD2's encoder in transformers' layout has SD1's keys; only a full-size one's width tells
    if family not in ("auto", detected):
        raise ModelLoadError(f"model_family is {family!r} but the weights are {detected.upper()} "
                             f"(set model_family: auto or {detected})")
    family = detected

    v_pred = v_parameterization if isinstance(v_parameterization, bool) else None
    how = "from the config"
    if v_pred is None:
        v_pred = _v_from_original_config(original_config)
        how = "from the yaml beside the checkpoint"
    if v_pred is None and "v_pred" in sd:
        v_pred, how = True, "from the checkpoint's v_pred marker"
    if v_pred is None:
        if family == "sd2":
            v_pred, how = True, ("assumed for SD2 (most SD2 checkpoints are 768-v); set v_parameterization: false "
                                 "for a 512-base model")
        else:
            v_pred, how = False, "default for this family"

    unet_cfg = _unet_config(family, original_config, sd)
    with _on_meta():
        unet = UNet2DConditionModel(**unet_cfg)
    _assign(unet, convert_ldm_unet_checkpoint(sd, unet.config), "UNet")

    vae_cfg = _vae_config(family, original_config, sd)
    with _on_meta():
        vae = AutoencoderKL(**vae_cfg)
    _assign(vae, convert_ldm_vae_checkpoint(sd, vae.config), "VAE")

    if family == "sd1":
        te_cfg = _clip_config_from_weights(sd, None, names.SD1_TE_PREFIX)
        te_sd = {k[len(names.SD1_TE_PREFIX):]: v for k, v in sd.items() if k.startswith(names.SD1_TE_PREFIX)}
        encoders = [_text_encoder(te_cfg, te_sd, False, "text encoder")]
        tokenizers = [clip_tokenizer(tokenizer_folder)]
    elif family == "sd2":
        # SD2 conditions on the penultimate layer: build the encoder without the last one (as diffusers does),
        # so last_hidden_state is what SD2 uses and the unused layer's tensors are left alone.
        if any(k.startswith(names.SD2_TE_PREFIX) for k in sd):
            te_cfg = _clip_config_from_weights(sd, names.SD2_TE_PREFIX, None, num_layers_drop=1)
            te_sd = names.openclip_to_hf(sd, names.SD2_TE_PREFIX, num_layers=te_cfg.num_hidden_layers)
        else:
            te_cfg = _clip_config_from_weights(sd, None, names.SD1_TE_PREFIX, num_layers_drop=1, act="gelu")
            te_sd = _hf_text_encoder(sd, names.SD1_TE_PREFIX, te_cfg.num_hidden_layers)
        te_sd.pop("text_projection.weight", None)
        encoders = [_text_encoder(te_cfg, te_sd, False, "text encoder (OpenCLIP)")]
        tokenizers = [clip_tokenizer(tokenizer_folder, pad_token="!")]
    else:
        te1_cfg = _clip_config_from_weights(sd, None, names.SDXL_TE1_PREFIX)
        te1_sd = {k[len(names.SDXL_TE1_PREFIX):]: v for k, v in sd.items() if k.startswith(names.SDXL_TE1_PREFIX)}
        if any(k.startswith(names.SDXL_TE2_PREFIX) for k in sd):
            te2_cfg = _clip_config_from_weights(sd, names.SDXL_TE2_PREFIX, None, projection=True)
            te2_sd = names.openclip_to_hf(sd, names.SDXL_TE2_PREFIX)
        else:
            te2_cfg = _clip_config_from_weights(sd, None, names.SDXL_TE2_HF_PREFIX, projection=True, act="gelu")
            te2_sd = _hf_text_encoder(sd, names.SDXL_TE2_HF_PREFIX, None)
        encoders = [_text_encoder(te1_cfg, te1_sd, False, "text encoder 1"),
                    _text_encoder(te2_cfg, te2_sd, True, "text encoder 2 (OpenCLIP)")]
        tok = clip_tokenizer(tokenizer_folder)
        tokenizers = [tok, clip_tokenizer(tokenizer_folder, pad_token="!")]

    model = BaseModel(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      noise_scheduler=_noise_scheduler(v_pred), v_prediction=v_pred, name=name, path=path,
                      source=source, hash_fn=hash_fn)
    model.freeze()
    log_fn(f"base model: {family.upper()} detected; {'v' if v_pred else 'epsilon'}-prediction {how}")
    return model


# --- entry points -----------------------------------------------------------------------------------
def training_dtypes(dtype: Optional[torch.dtype]) -> Optional[DtypeFor]:
    """dtype_for for read_checkpoint: the UNet and text encoders in `dtype`, the VAE in fp32 (SD VAEs overflow
    in fp16); None keeps every tensor as stored."""
    if dtype is None:
        return None
    return lambda key: torch.float32 if key.startswith(names.VAE_PREFIX) else dtype


def load_single_file(path: Path, family="auto", v_parameterization="auto", log_fn=print,
                     dtype: Optional[torch.dtype] = None) -> BaseModel:
    """dtype: the precision of the UNet and text encoders (the VAE gets fp32), reached tensor by tensor while
    reading; None keeps the file's."""
    sd = read_checkpoint(path, training_dtypes(dtype))
    original_config = _read_yaml_beside(path)
    if original_config is not None:
        log_fn(f"using {path.with_suffix('.yaml').name} beside the checkpoint for its architecture")
    try:
        return build_from_ldm_state_dict(sd, family=family, v_parameterization=v_parameterization,
                                         original_config=original_config, name=path.stem, path=str(path),
                                         source="single-file", hash_fn=lambda: file_sha256(path), log_fn=log_fn)
    except ArchitectureMismatch as e:
        if original_config is not None:
            raise ModelLoadError(f"{path.name}: {e}; {path.with_suffix('.yaml').name} beside it does not describe "
                                 f"these weights") from None
        raise ModelLoadError(f"{path.name}: {e}. A checkpoint with a non-standard architecture needs its config "
                             f"beside it: put its .yaml next to it as {path.with_suffix('.yaml').name} (as in the "
                             f"WebUIs)") from None


def load_diffusers_folder(folder: Path, family="auto", v_parameterization="auto", log_fn=print,
                          source: str = "diffusers", name: Optional[str] = None,
                          dtype: Optional[torch.dtype] = None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # loaded in the training precision (the VAE in fp32), not in fp32 and cast afterwards
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **({"torch_dtype": dtype} if dtype else {}))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te_kwargs = {transformers_dtype_kwarg(): dtype} if dtype else {}
    if (folder / "text_encoder_2").is_dir():
        detected = "sdxl"
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **te_kwargs),
                    CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **te_kwargs)]
        tokenizers = [clip_tokenizer(folder / "tokenizer"),
                      clip_tokenizer(folder / "tokenizer_2", pad_token="!")]
    else:
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **te_kwargs)]
        detected = "sd2" if encoders[0].config.hidden_act == "gelu" else "sd1"
        tokenizers = [clip_tokenizer(folder / "tokenizer", pad_token="!" if detected == "sd2" else "<|endoftext|>")]
    if family not in ("auto", detected):
        raise ModelLoadError(f"model_family is {family!r} but {folder} holds an {detected.upper()} model")
    if isinstance(v_parameterization, bool):
        v_pred = v_parameterization
    else:
        sched = folder / "scheduler" / "scheduler_config.json"
        v_pred = sched.is_file() and json.loads(sched.read_text()).get("prediction_type") == "v_prediction"
    model = BaseModel(family=detected, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      noise_scheduler=_noise_scheduler(v_pred, folder), v_prediction=v_pred,
                      name=name or folder.name, path=str(folder), source=source)
    model.freeze()
    log_fn(f"base model: {detected.upper()} diffusers folder; {'v' if v_pred else 'epsilon'}-prediction")
    return model


def load_base_model(base_model: str, family="auto", v_parameterization="auto", vae: Optional[str] = None,
                    log_fn=print, dtype: Optional[torch.dtype] = None) -> BaseModel:
    """dtype: the precision training wants for the UNet and text encoders (the VAE is fp32 then), reached while
    loading so that no second copy of the weights is made by a cast; None keeps what the source holds."""
    if not base_model:
        raise ModelLoadError("base_model is required: a .safetensors/.ckpt file, a diffusers folder or a hub id")
    path = Path(os.path.expanduser(base_model))
    if path.is_file():
        model = load_single_file(path, family, v_parameterization, log_fn, dtype=dtype)
    elif path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelLoadError(f"{path} is a folder but not a diffusers model (no unet/ subfolder)")
        model = load_diffusers_folder(path, family, v_parameterization, log_fn, dtype=dtype)
    elif base_model.count("/") == 1 and not base_model.startswith((".", "/", "~")):
        model = _load_hub(base_model, family, v_parameterization, log_fn, dtype=dtype)
    else:
        raise ModelLoadError(f"base_model: {base_model} does not exist (expected a checkpoint file, a diffusers "
                             f"folder or a hub id like user/model)")
    if vae:
        _replace_vae(model, vae)
    return model


def _load_hub(repo: str, family, v_parameterization, log_fn, dtype: Optional[torch.dtype] = None) -> BaseModel:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo, allow_patterns=["*.json", "*.txt", "unet/*.safetensors",
                                                         "vae/*.safetensors", "text_encoder*/*.safetensors"])
    except Exception as e:
        raise ModelLoadError(f"base_model: could not download {repo} from the hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}). Offline? Use a local file or folder.")
    return load_diffusers_folder(Path(folder), family, v_parameterization, log_fn, source="hub", name=repo,
                                 dtype=dtype)


def _replace_vae(model: BaseModel, vae: str) -> None:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(vae)
    if path.is_dir():
        model.vae = AutoencoderKL.from_pretrained(path, subfolder="vae" if (path / "vae").is_dir() else None)
    elif path.is_file():
        sd = read_checkpoint(path, lambda key: torch.float32)  # the VAE trains in fp32
        if not any(k.startswith(names.VAE_PREFIX) for k in sd):
            sd = {names.VAE_PREFIX + k: v for k, v in sd.items()}
        with _on_meta():
            new = AutoencoderKL(**dict(model.vae.config))
        model.vae = _assign(new, convert_ldm_vae_checkpoint(sd, new.config), f"VAE {path.name}")
    else:
        raise ModelLoadError(f"vae: {vae} does not exist")
    model.vae.requires_grad_(False)
    model.vae.eval()
