"""Causal LM + tokenizer loading, LoRA injection with peft, adapter folders and merging.

Works with transformers 4.30 (the A1111 WebUI's pin) and 5.x, peft 0.13 and newer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import ConfigError, TrainConfig
from ..fsutil import write_folder_atomically

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"

# Default LoRA targets per transformers model_type (attention projections). Names that a model does not have
# are dropped; when none is left, every Linear layer but the output head is adapted.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "cohere", "olmo", "olmo2", "stablelm", "starcoder2", "granite", "deepseek_v2", "internlm2", "yi", "smollm3")},
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "codegen": ["qkv_proj"],
}


def _dtype_kwarg() -> str:
    from ..models.loader import transformers_dtype_kwarg

    return transformers_dtype_kwarg()


def _check_source(value: str, key: str) -> None:
    """A local path must exist and be a folder; anything else is left to transformers as a hub id."""
    p = Path(value).expanduser()
    if p.is_file():
        raise ConfigError(f"{key}: {value} is a file; text-generation needs a transformers model folder (config.json, "
                          f"weights and tokenizer files) or a Hugging Face hub id")
    if not p.exists() and (value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1):
        raise ConfigError(f"{key}: {value} does not exist (expected a transformers model folder with config.json, "
                          f"or a Hugging Face hub id like meta-llama/Llama-2-7b-chat-hf)")


def load_tokenizer(source: str, key: str = "base_model"):
    from transformers import AutoTokenizer

    _check_source(source, key)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a tokenizer from {source}: {e}") from None
    return tok


def load_causal_lm(source: str, dtype: torch.dtype = torch.float32, key: str = "base_model", **load_options):
    """load_options: further from_pretrained arguments (quantization.quantization_kwargs)."""
    from transformers import AutoModelForCausalLM

    _check_source(source, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **{_dtype_kwarg(): dtype}, **load_options)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot load a causal language model from {source}: {e}") from None
    return model


def _linear_types():
    types = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:
        pass
    return tuple(types)


def linear_module_names(model) -> list[str]:
    """Leaf names of the Linear (and GPT-2 Conv1D) layers, without the output head, in model order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, _linear_types()) and mod is not head:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def _has_module(model, target: str) -> bool:
    return any(n == target or n.endswith("." + target) for n, _ in model.named_modules())


def resolve_target_modules(model, requested: Optional[list]) -> list[str]:
    available = linear_module_names(model)
    if requested:
        missing = [t for t in requested if not _has_module(model, t)]
        if missing:
            raise ConfigError(f"target_modules: {', '.join(missing)} not found in this "
                              f"{getattr(model.config, 'model_type', 'model')} model; its Linear layers are: "
                              f"{', '.join(available)}")
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    chosen = [t for t in DEFAULT_TARGETS.get(model_type, []) if t in available]
    if not chosen:
        chosen = available
    if not chosen:
        raise ConfigError(f"target_modules: the {model_type or 'given'} model has no Linear layer to adapt; set "
                          f"target_modules explicitly")
    return chosen


def _uses_conv1d(model, targets: list[str]) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())


def read_adapter_config(folder: Path, key: str) -> dict:
    folder = Path(folder)
    cfg_file = folder / ADAPTER_CONFIG
    if not cfg_file.is_file():
        if not folder.exists():
            what = "does not exist"
        elif folder.is_file():
            what = (f"is a file ({folder.suffix or 'no extension'}); kohya .safetensors LoRAs are for text-to-image"
                    if folder.suffix.lower() == ".safetensors" else f"is a file ({folder.suffix or 'no extension'})")
        else:
            what = f"is a folder without {ADAPTER_CONFIG}"
        raise ConfigError(f"{key}: {folder} {what}; expected a peft adapter folder ({ADAPTER_CONFIG} + "
                          f"{ADAPTER_WEIGHTS}) as written by a text-generation run")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{key}: {cfg_file} is not valid JSON: {e}") from None


def read_adapter_weights(folder: Path) -> dict:
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / ADAPTER_WEIGHTS))
    if (folder / ADAPTER_WEIGHTS_BIN).is_file():
        from ..safeload import weights_only_load

        return weights_only_load(folder / ADAPTER_WEIGHTS_BIN)
    raise ConfigError(f"init_lora_weights: {folder} has no {ADAPTER_WEIGHTS}")


def make_lora_config(cfg: TrainConfig, model, targets: list[str], alpha: Optional[float] = None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.effective_alpha if alpha is None else alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=_uses_conv1d(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_init_adapter(cfg: TrainConfig, adapter_cfg: dict, targets: list[str], folder) -> Optional[float]:
    """Refuses an adapter of another shape; returns the alpha to use (the adapter's when lora_alpha is unset)."""
    problems = []
    if int(adapter_cfg.get("r", -1)) != cfg.lora_rank:
        problems.append(f"rank {adapter_cfg.get('r')} (this run: lora_rank {cfg.lora_rank})")
    theirs = adapter_cfg.get("target_modules")
    theirs_set = {theirs} if isinstance(theirs, str) else set(theirs or [])
    if theirs_set != set(targets):
        problems.append(f"target modules {sorted(theirs_set)} (this run: {sorted(targets)})")
    alpha = adapter_cfg.get("lora_alpha")
    if cfg.lora_alpha is not None and alpha is not None and float(alpha) != float(cfg.lora_alpha):
        problems.append(f"lora_alpha {alpha} (this run: {cfg.lora_alpha})")
    if problems:
        raise ConfigError(f"init_lora_weights: {folder} was trained with " + " and ".join(problems) +
                          "; set lora_rank, target_modules and lora_alpha to the adapter's values to continue "
                          "training it, or remove init_lora_weights to start a new adapter")
    return float(alpha) if alpha is not None and cfg.lora_alpha is None else None


def add_lora(cfg: TrainConfig, model, message: Callable[[str], None] = lambda m: None):
    """Wraps model in a peft LoRA model (optionally starting from cfg.init_lora_weights). Returns (peft model,
    target module names). Trainable LoRA weights are kept in fp32."""
    from peft import get_peft_model, set_peft_model_state_dict

    targets = resolve_target_modules(model, cfg.target_modules)
    alpha = None
    init_weights = None
    if cfg.init_lora_weights:
        folder = Path(cfg.init_lora_weights)
        adapter_cfg = read_adapter_config(folder, "init_lora_weights")
        if cfg.target_modules is None:  # take the adapter's targets when the run does not name any
            theirs = adapter_cfg.get("target_modules") or []
            targets = resolve_target_modules(model, [theirs] if isinstance(theirs, str) else list(theirs))
        alpha = check_init_adapter(cfg, adapter_cfg, targets, folder)
        init_weights = read_adapter_weights(folder)
    model = get_peft_model(model, make_lora_config(cfg, model, targets, alpha))
    if init_weights is not None:
        result = set_peft_model_state_dict(model, init_weights)
        unexpected = [k for k in getattr(result, "unexpected_keys", None) or [] if "lora_" in k]
        missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k]
        if unexpected or missing:
            raise ConfigError(f"init_lora_weights: {cfg.init_lora_weights} does not fit this model (e.g. "
                              f"{(unexpected or missing)[0]} is {'unexpected' if unexpected else 'missing'}); was it "
                              f"trained on another base model?")
        message(f"init_lora_weights: continuing from {cfg.init_lora_weights}")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model, targets


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_adapter_files(model, tokenizer, folder: Path, dtype: torch.dtype = torch.float32,
                       weights: Optional[dict] = None) -> None:
    """adapter_model.safetensors + adapter_config.json (peft's save_pretrained) + tokenizer files into folder.
    weights: the LoRA weights whole, when the model's own are shards (FSDP)."""
    source = weights if weights is not None else model.state_dict()
    state = {k: v.detach().to(dtype) for k, v in source.items() if "lora_" in k}
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def merge_adapter(adapter: str, output: str, base_model: Optional[str] = None, overwrite: bool = False) -> Path:
    """Loads base_model (default: the adapter's base_model_name_or_path), applies the adapter, merges it into the
    weights and writes a plain transformers model folder (save_pretrained, safetensors) plus the tokenizer."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    adapter_cfg = read_adapter_config(adapter_dir, "adapter")
    base = base_model or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG} does not name its base model; pass --base-model")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output: {out} already exists and is not empty; choose another --output or pass "
                          f"--overwrite")
    if out.resolve() == adapter_dir.resolve():
        raise ConfigError("output: must not be the adapter folder itself")
    from transformers import AutoModelForCausalLM

    _check_source(base, "base_model")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **{_dtype_kwarg(): "auto"})
    except (OSError, ValueError) as e:
        raise ConfigError(f"base_model: cannot load a causal language model from {base}: {e}") from None
    has_tok = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = load_tokenizer(str(adapter_dir) if has_tok else base, "adapter" if has_tok else "base_model")
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = model.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    if out.exists() and out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    return write_folder_atomically(out, write, replace=True)
