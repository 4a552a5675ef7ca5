"""TrainConfig: every option, its default and its validation; YAML load and save.

The single source of truth for the CLI, the WebUI tab and the metadata written into the LoRA file.
Only stdlib and yaml are imported here (design.md), so every layer can use it cheaply.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .fsutil import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)


NETWORK_TYPES = {
    "lora": "LoRA: low-rank update of the attention and feed-forward layers; the smallest files, loads everywhere "
            "(rank 8-32)",
    "locon": "LoCon: LoRA that also adapts the ResNet convolutions; more texture and style detail (rank 8-32, "
             "conv 4-16)",
    "loha": "LoHa: Hadamard product of two low-rank pairs; more expressive per parameter, good for styles "
            "(rank 4-16)",
    "lokr": "LoKr: Kronecker product of a small and a large factor; tiny files, quick to learn a subject "
            "(factor 8-16, rank 4-16 or full)",
}


class ConfigError(ValueError):
    """A config value a person has to fix; the message names the key, the value and what is allowed."""


def _opt(default, help: str, choices=None, min=None, max=None, group: str = "advanced"):
    meta = {"help": help, "choices": choices, "min": min, "max": max, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    task_type: str = _opt("text-to-image", "text-to-image (Stable Diffusion LoRA) or text-generation (causal LM LoRA)",
                          choices=["text-to-image", "text-generation"], group="model")
    base_model: Optional[str] = _opt(None, "single-file checkpoint (.safetensors/.ckpt), diffusers folder or hub id",
                                     group="model")
    model_family: str = _opt("auto", "model family; auto detects it from the weights",
                             choices=["auto", "sd1", "sd2", "sdxl", "flux"], group="model")
    v_parameterization: Union[bool, str] = _opt("auto", "v-prediction model (SD2 768-v); auto reads it from the "
                                                 "model's config or yaml", group="model")
    vae: Optional[str] = _opt(None, "optional VAE file or folder that replaces the checkpoint's VAE")
    flux_components: Optional[str] = _opt(None, "FLUX.1 from a single transformer file: the diffusers-layout folder "
                                          "with its vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ "
                                          "and scheduler/ (default: a same-named folder beside the file)")
    timestep_sampling: str = _opt("sigmoid", "FLUX.1: how noise levels are drawn (uniform, sigmoid = logit-normal, "
                                  "shift, flux_shift = shifted by the image size)",
                                  choices=["uniform", "sigmoid", "shift", "flux_shift"])
    sigmoid_scale: float = _opt(1.0, "FLUX.1: spread of the logit-normal noise levels", min=0.0)
    discrete_flow_shift: float = _opt(3.0, "FLUX.1: the shift of timestep_sampling: shift", min=0.0)
    guidance_scale: float = _opt(1.0, "FLUX.1 dev: the guidance value the transformer is given while training",
                                 min=0.0)
    t5xxl_max_token_length: Optional[int] = _opt(None, "FLUX.1: T5 tokens per caption (longer is cut; default: 512 "
                                                 "for dev, 256 for schnell, as BFL's pipelines encode)", min=1,
                                                 max=512)
    fp8_base: bool = _opt(False, "FLUX.1: keep the frozen transformer in float8_e4m3fn (half of bf16's memory), each "
                          "layer cast to the compute precision when it runs; the LoRA itself stays fp32")
    nf4_base: bool = _opt(False, "FLUX.1: keep the frozen transformer in 4-bit nf4 (bitsandbytes, QLoRA's storage: "
                          "about a quarter of bf16's memory, a little less faithful than fp8), dequantized layer by "
                          "layer as it runs; the LoRA itself stays fp32. Needs bitsandbytes")
    blocks_to_swap: int = _opt(0, "FLUX.1: keep the frozen weights of this many transformer blocks in CPU memory and "
                               "copy them to the GPU layer by layer as they run (kohya's meaning: N // 2 double and "
                               "(N - N // 2) * 2 single blocks, the last ones): less GPU memory, slower steps",
                               min=0, max=38)
    clip_skip: int = _opt(1, "use the output of the N-th last text-encoder layer (2 for anime-style SD1 models)",
                          min=1, max=12)

    # --- data ------------------------------------------------------------------------------------
    train_data_dir: Optional[str] = _opt(None, "training data: images (sidecar .txt captions, metadata.csv or N_name "
                                         "repeat folders), or .txt/.jsonl for text-generation", group="data")
    metadata_path: Optional[str] = _opt(None, "CSV with file_name,caption rows (header optional)", group="data")
    caption_extension: str = _opt(".txt", "extension of sidecar caption files")
    reg_data_dir: Optional[str] = _opt(None, "regularization images (prior preservation)")
    reg_weight: float = _opt(1.0, "loss weight of regularization images", min=0.0)
    num_repeats: int = _opt(1, "repeats for images not in an N_name folder", min=1)
    resolution: Union[int, str, list] = _opt(512, "training resolution: 512, or width,height", group="basic")
    enable_bucket: bool = _opt(True, "aspect-ratio bucketing")
    min_bucket_reso: int = _opt(256, "smallest bucket side", min=64)
    max_bucket_reso: int = _opt(1024, "largest bucket side", min=64)
    bucket_reso_steps: int = _opt(64, "bucket side step", min=8)
    bucket_no_upscale: bool = _opt(True, "never upscale an image to fill a larger bucket")
    random_crop: bool = _opt(False, "random instead of center crop into the bucket")
    flip_aug: bool = _opt(False, "random horizontal flip (disables latent caching)")
    alpha_background: str = _opt("white", "colour transparent images are composited on: white, black or #rrggbb")
    shuffle_caption: bool = _opt(False, "shuffle comma-separated tags")
    keep_tokens: int = _opt(0, "number of leading tags never shuffled or dropped", min=0)
    caption_dropout_rate: float = _opt(0.0, "probability of training a sample with an empty caption", min=0.0, max=1.0)
    caption_tag_dropout_rate: float = _opt(0.0, "probability of dropping each tag", min=0.0, max=1.0)
    caption_prefix: str = _opt("", "text put before every caption (trigger word)", group="basic")
    caption_suffix: str = _opt("", "text put after every caption")
    max_token_length: int = _opt(225, "longest caption in tokens: 75, 150 or 225 (longer is truncated with a warning)",
                                 choices=[75, 150, 225])
    cache_latents: bool = _opt(True, "encode every image with the VAE once before training")
    cache_latents_to_disk: bool = _opt(False, "keep the latent cache on disk so a second run skips the VAE")
    cache_dir: Optional[str] = _opt(None, "where the disk cache goes (default: output_dir/cache)")
    dataloader_workers: int = _opt(0, "image loading worker processes", min=0)

    # --- output ----------------------------------------------------------------------------------
    output_dir: str = _opt("./output", "where the LoRA, checkpoints and logs go", group="basic")
    output_name: Optional[str] = _opt(None, "file name of the LoRA (default: the config file's name)", group="basic")
    save_precision: str = _opt("fp16", "dtype of the saved LoRA", choices=["fp16", "bf16", "fp32"])
    overwrite: bool = _opt(False, "replace an existing LoRA of the same name (otherwise a numbered name is used)")
    save_steps: int = _opt(0, "save a resumable checkpoint every N optimizer steps (0: off)", min=0)
    save_every_n_epochs: int = _opt(0, "save a resumable checkpoint every N epochs (0: off)", min=0)
    save_last_n_checkpoints: int = _opt(0, "keep only the newest N checkpoints (0: keep all)", min=0)
    resume_from_checkpoint: Optional[str] = _opt(None, "checkpoint folder to resume from, or 'latest'")
    init_lora_weights: Optional[str] = _opt(None, "continue from an existing LoRA (a kohya file, or a peft adapter folder for "
                                           "text-generation)")

    # --- training --------------------------------------------------------------------------------
    batch_size: int = _opt(1, "samples per step", min=1, group="basic")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step", min=1)
    epochs: int = _opt(10, "passes over the dataset (ignored when max_train_steps is set)", min=1, group="basic")
    max_train_steps: Optional[int] = _opt(None, "total optimizer steps; overrides epochs", min=1, group="basic")
    learning_rate: float = _opt(1e-4, "base learning rate", min=0.0, group="basic")
    unet_lr: Optional[float] = _opt(None, "UNet learning rate (default: learning_rate)", min=0.0)
    text_encoder_lr: Optional[float] = _opt(None, "text encoder learning rate (default: learning_rate)", min=0.0)
    train_unet: bool = _opt(True, "train LoRA on the UNet")
    train_text_encoder: bool = _opt(False, "also train LoRA on the text encoder(s)", group="basic")
    lr_scheduler: str = _opt("constant", "learning-rate schedule",
                             choices=["constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                                      "linear", "polynomial"])
    lr_warmup_steps: int = _opt(0, "warm-up steps", min=0)
    lr_scheduler_num_cycles: int = _opt(1, "restarts for cosine_with_restarts", min=1)
    lr_scheduler_power: float = _opt(1.0, "power for polynomial", min=0.0)
    optimizer: str = _opt("adamw", "optimizer", choices=["adamw", "adamw8bit", "prodigy", "lion", "adafactor"])
    optimizer_args: dict = _opt({}, "extra optimizer keyword arguments, e.g. {betas: [0.9, 0.99]}")
    weight_decay: float = _opt(0.01, "weight decay", min=0.0)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)", min=0.0)
    seed: int = _opt(42, "random seed", min=0)

    # --- network ---------------------------------------------------------------------------------
    lora_rank: int = _opt(16, "LoRA rank (network dim)", min=1, max=1024, group="basic")
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha; scale is alpha/rank (default: rank, i.e. scale 1)",
                                       min=0.0, group="basic")
    network_type: str = _opt("lora", "adapter type: lora (attention layers), locon (LoRA + the convolutions), loha "
                             "(Hadamard product of two low-rank pairs), lokr (Kronecker product); see the README",
                             choices=list(NETWORK_TYPES), group="basic")
    lora_dropout: float = _opt(0.0, "dropout on the adapter's input (LoRA/LoCon: on the LoRA path)", min=0.0, max=1.0)
    rank_dropout: float = _opt(0.0, "probability of dropping each rank (LoRA) or output row (LoHa/LoKr) of the update "
                               "in a training step", min=0.0, max=1.0)
    module_dropout: float = _opt(0.0, "probability of skipping a module's whole update in a training step", min=0.0,
                                 max=1.0)
    conv_lora: bool = _opt(False, "LoCon: also train the ResNet and up/down-sampler convolutions (the same as "
                           "network_type: locon; LoHa and LoKr always do)")
    conv_rank: Optional[int] = _opt(None, "rank of the 3x3 convolution adapters (conv_dim; default: lora_rank)", min=1,
                                    max=1024)
    conv_alpha: Optional[float] = _opt(None, "alpha of the 3x3 convolution adapters (default: conv_rank)", min=0.0)
    use_dora: bool = _opt(False, "DoRA (weight-decomposed: a trained magnitude per input channel), for every "
                          "network_type")
    lokr_factor: int = _opt(-1, "LoKr: the size of the small Kronecker factor (-1: as square as possible; 4, 8, 16 "
                            "are common)", min=-1)
    decompose_both: bool = _opt(False, "LoKr: also split the small factor into two low-rank matrices")
    lokr_full_rank: bool = _opt(False, "LoKr: keep the large factor w2 as a full matrix instead of a rank-r pair")
    use_tucker: bool = _opt(False, "LoHa/LoKr: Tucker-decomposed 3x3 convolutions (hada_t1/t2, lokr_t2)")
    target_modules: Optional[list] = _opt(None, "module names to adapt (default: kohya's targets, or per "
                                          "architecture for text-generation)")

    # --- precision, memory, loss -----------------------------------------------------------------
    mixed_precision: str = _opt("no", "mixed precision", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = _opt(False, "trade compute for memory")
    min_snr_gamma: Optional[float] = _opt(None, "min-SNR loss weighting gamma (5 is common; off when unset)", min=0.0)
    noise_offset: float = _opt(0.0, "noise offset (0.05-0.1 helps very dark/bright images)", min=0.0, max=1.0)
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, mps ...")

    # --- logging and samples ---------------------------------------------------------------------
    log_with: str = _opt("tensorboard", "training logs", choices=["tensorboard", "none"])
    logging_dir: Optional[str] = _opt(None, "TensorBoard folder (default: output_dir/logs)")
    sample_prompts: Optional[Union[list, str]] = _opt(None, "prompts to render during training (list or .txt file)")
    sample_every_n_steps: int = _opt(0, "render the sample prompts every N steps (0: only at the end)", min=0)
    sample_steps: int = _opt(20, "sampling steps for samples", min=1)
    sample_cfg_scale: float = _opt(7.0, "classifier-free guidance for samples", min=0.0)
    sample_seed: int = _opt(1234, "seed of the samples", min=0)
    sample_width: Optional[int] = _opt(None, "sample width (default: resolution)", min=8)
    sample_height: Optional[int] = _opt(None, "sample height (default: resolution)", min=8)

    # --- text-generation (task_type: text-generation) --------------------------------------------
    max_seq_length: int = _opt(512, "text-generation: longest sample in tokens", min=8)
    prompt_template: str = _opt("none", "text-generation: none, llama2-inst, chatml or chat-template",
                                choices=["none", "llama2-inst", "chatml", "chat-template"])
    packing: bool = _opt(False, "text-generation: pack short samples into one sequence")
    validation_split: float = _opt(0.0, "text-generation: held-out fraction for validation loss", min=0.0, max=0.5)
    early_stopping_patience: int = _opt(0, "text-generation: stop after N validations without improvement (0: off)",
                                        min=0)
    load_in_4bit: bool = _opt(False, "text-generation: QLoRA, the base model in 4 bits (nf4, double quantization, "
                                     "bf16 compute; needs a CUDA GPU and bitsandbytes)")
    load_in_8bit: bool = _opt(False, "text-generation: the base model in 8 bits (needs a CUDA GPU and bitsandbytes)")

    # ---------------------------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def effective_conv_rank(self) -> int:
        return int(self.conv_rank or self.lora_rank)

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.effective_conv_rank if self.conv_alpha is None else self.conv_alpha)

    @property
    def adapter_type(self) -> str:
        """lora, locon, loha or lokr: conv_lora turns lora into locon (kept for older configs)."""
        return "locon" if self.network_type == "lora" and self.conv_lora else self.network_type

    @property
    def trains_convs(self) -> bool:
        return self.adapter_type != "lora"

    @property
    def resolution_wh(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)

    @property
    def name(self) -> str:
        return self.output_name or "lora"

    def validate(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if value is False and choices and hints[f.name] is str:
                # YAML 1.1 reads `no` / `off` / `none`-like words as false: give the word back
                value = next((w for w in ("no", "none", "off") if w in choices), value)
            value = _coerce(f.name, value, hints[f.name])
            meta = f.metadata
            if value is not None and meta.get("choices") is not None and value not in meta["choices"]:
                if not (f.name == "v_parameterization"):
                    raise ConfigError(f"{f.name}: {value!r} is not allowed; choose one of "
                                      f"{', '.join(map(str, meta['choices']))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if meta.get("min") is not None and value < meta["min"]:
                    raise ConfigError(f"{f.name}: {value!r} is too small; it must be >= {meta['min']}")
                if meta.get("max") is not None and value > meta["max"]:
                    raise ConfigError(f"{f.name}: {value!r} is too large; it must be <= {meta['max']}")
            object.__setattr__(self, f.name, value)
        if self.v_parameterization not in ("auto", True, False):
            raise ConfigError(f"v_parameterization: {self.v_parameterization!r} is not allowed; use auto, true or false")
        parse_resolution(self.resolution)
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ConfigError(f"min_bucket_reso ({self.min_bucket_reso}) is larger than max_bucket_reso "
                              f"({self.max_bucket_reso})")
        if self.bucket_reso_steps % 8:
            raise ConfigError(f"bucket_reso_steps: {self.bucket_reso_steps} must be a multiple of 8")
        if self.output_name is not None:
            check_output_name(self.output_name)
        if self.fp8_base and self.nf4_base:
            raise ConfigError("fp8_base and nf4_base are both true: choose one storage for the frozen transformer "
                              "(fp8 is closer to bf16, nf4 is half its size)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both true: choose one (4 bits is QLoRA)")
        if (self.load_in_4bit or self.load_in_8bit) and self.task_type != "text-generation":
            raise ConfigError(f"load_in_{4 if self.load_in_4bit else 8}bit is for task_type: text-generation (the "
                              f"image trainer's keys for FLUX.1 are nf4_base: true, the transformer in 4-bit nf4, "
                              f"and fp8_base: true, in fp8)")
        if not self.train_unet and not self.train_text_encoder and self.task_type == "text-to-image":
            raise ConfigError("train_unet and train_text_encoder are both false: there is nothing to train")

    def require(self, *keys: str) -> None:
        """Checks keys that are optional in the schema but needed for a run."""
        for key in keys:
            if getattr(self, key) in (None, ""):
                raise ConfigError(f"{key} is required: {fields_help()[key]}")

    # ---- dict / YAML ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save_yaml(self, path: Union[str, Path]) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    def replace(self, **changes) -> "TrainConfig":
        return from_dict({**self.to_dict(), **changes})


MAX_NAME_LENGTH = 120
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_FORBIDDEN_CHARS = set('/\\<>:"|?*')


# how the trainer stores a FLUX.1 transformer it loads itself, with each key's off value: a WebUI's model is trained
# as the WebUI holds it, and a Stable Diffusion model has no such transformer
FLUX_OWN_LOAD = {"fp8_base": False, "nf4_base": False, "blocks_to_swap": 0}


def check_output_name(name: str) -> None:
    """output_name becomes a file name in the run folder and in the WebUI's LoRA folder, on any OS: one plain
    path component, checked here so a run never trains for an hour and then fails at the final save."""
    what = f"output_name: {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("output_name: empty; give the LoRA a name (it becomes its file name)")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"output_name: {len(name)} characters; use at most {MAX_NAME_LENGTH}")
    bad = sorted({c for c in name if c in _FORBIDDEN_CHARS or not c.isprintable()})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ConfigError(f"{what[:80]} contains {shown}; use a plain file name (letters, digits, spaces, - _ . "
                          f"and the like), no folders")
    if name in (".", "..") or name != name.strip() or name.endswith("."):
        raise ConfigError(f"{what} must not be '.' or '..', or start or end with a space or end with a dot")
    if name.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        raise ConfigError(f"{what} is a reserved device name on Windows; choose another name")


# Keys of other trainers' configs (kohya sd-scripts, lora-scripts) that mean the same as ours.
ALIASES = {
    "pretrained_model_name_or_path": "base_model",
    "pretrained_model": "base_model",
    "network_dim": "lora_rank",
    "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout",
    "conv_dim": "conv_rank",
    "algo": "network_type",
    "factor": "lokr_factor",
    "full_matrix": "lokr_full_rank",
    "dora_wd": "use_dora",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "lr": "learning_rate",
    "lr_warmup": "lr_warmup_steps",
    "optimizer_type": "optimizer",
    "save_every_n_steps": "save_steps",
    "resume": "resume_from_checkpoint",
    "network_weights": "init_lora_weights",
    "v2_parameterization": "v_parameterization",
    "v_prediction": "v_parameterization",
    "dataset_dir": "train_data_dir",
    "logging_with": "log_with",
    "seq_length": "max_seq_length",
}

OPTIMIZER_ALIASES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "prodigy": "prodigy",
                     "lion": "lion", "adafactor": "adafactor"}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def fields_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(TrainConfig)}


def field_meta() -> dict[str, dict]:
    return {f.name: dict(f.metadata, default=_default_of(f)) for f in fields(TrainConfig)}


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def parse_resolution(value) -> tuple[int, int]:
    """512 -> (512, 512); "768,512" / [768, 512] -> (768, 512) as (width, height)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            w = h = value
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            w, h = int(value[0]), int(value[1])
        elif isinstance(value, str):
            parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
            if len(parts) == 1:
                w = h = int(parts[0])
            elif len(parts) == 2:
                w, h = int(parts[0]), int(parts[1])
            else:
                raise ValueError
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"resolution: {value!r} is not a resolution; use 512 or width,height like 768,512") from None
    if w < 64 or h < 64 or w % 8 or h % 8:
        raise ConfigError(f"resolution: {value!r} must be at least 64 and a multiple of 8 on each side")
    return w, h


def _coerce(key: str, value, hint):
    """Accepts what YAML and command lines produce ("1e-4", "true", 5) for the declared type."""
    if value is None:
        return None
    origin = get_origin(hint)
    options = get_args(hint) if origin is Union else (hint,)
    options = [o for o in options if o is not type(None)]
    if any(isinstance(value, o) and not (o is int and isinstance(value, bool)) for o in options if isinstance(o, type)):
        if float in options and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    for o in options:
        try:
            if o is bool:
                if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
                    return True
                if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
                    return False
            elif o is int and not isinstance(value, bool):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                if isinstance(value, str):
                    return int(value.strip())
            elif o is float and not isinstance(value, bool):
                if isinstance(value, (int, str)):
                    return float(value)
            elif o is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            elif o is list and isinstance(value, str) and key in ("target_modules",):
                return [v.strip() for v in value.split(",") if v.strip()]
            elif o is dict and isinstance(value, str):
                loaded = yaml.safe_load(value)
                if isinstance(loaded, dict):
                    return loaded
        except (TypeError, ValueError):
            continue
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}: {value!r} has the wrong type; expected {wanted}")


def from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    known = set(field_names())
    clean: dict[str, Any] = {}
    for raw_key, value in (data or {}).items():
        key = str(raw_key).strip().replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | set(ALIASES)), n=1, cutoff=0.6)
            hint = f"; did you mean {ALIASES.get(close[0], close[0])!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {raw_key!r}{hint} (python -m lora_trainer train --help lists "
                              f"every key)")
        if key == "optimizer" and isinstance(value, str):
            value = OPTIMIZER_ALIASES.get(value.lower().replace("-", ""), value)
        if key == "log_with" and value in (None, False, "", "None"):
            value = "none"
        if key == "network_type" and isinstance(value, str):
            value = {"conv_lora": "locon", "lycoris": "locon", "hada": "loha", "kron": "lokr"}.get(
                value.strip().lower(), value.strip().lower())
        if key == "conv_lora" and isinstance(value, int) and not isinstance(value, bool) and value > 1:
            # lora-scripts/kohya style: a number is the conv rank
            clean["conv_rank"] = value
            value = True
        clean[key] = value
    return TrainConfig(**clean)


def load_yaml(path: Union[str, Path], overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value")
    data = {**data, **(overrides or {})}
    # Relative paths stay relative to the working directory, as in lora-scripts and kohya.
    if "output_name" not in data:
        data["output_name"] = path.stem
    return from_dict(data, source=str(path))
