"""The Parameters form, generated from `config.field_meta()` (no Gradio here).

Each config key becomes one widget: a checkbox (bool), a dropdown (choices), a whole number (required ints)
or a text box (everything else, parsed like a YAML value: "1e-4", "768,512", "[a, b]", "" for none).
`form_to_config` turns widget values back into a TrainConfig through `from_dict`, so the form, the YAML
file and the CLI flags accept and reject exactly the same things.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ..config import NETWORK_TYPES, TrainConfig, field_meta, from_dict

# Keys that other sections of the tab own: the dataset folder (Dataset) and the base model (the host's).
MANAGED_ELSEWHERE = ("train_data_dir", "base_model")
# Keys of text-generation training, which the image tab does not do (the CLI does).
TEXT_GENERATION_KEYS = ("task_type", "max_seq_length", "prompt_template", "packing", "validation_split",
                        "early_stopping_patience", "load_in_4bit", "load_in_8bit")
# Basic fields in this order first (name first); any other "basic" key follows.
BASIC_ORDER = ("output_name", "caption_prefix", "resolution", "network_type", "lora_rank", "lora_alpha",
               "learning_rate", "batch_size", "epochs", "max_train_steps", "train_text_encoder", "output_dir")
LABELS = {"output_name": "LoRA name", "caption_prefix": "Trigger word (put first in every caption)",
          "output_dir": "Run folder (one sub-folder per LoRA name)", "seed": "Training seed",
          "lora_alpha": "LoRA alpha (scale = alpha / rank)", "conv_lora": "LoCon (also train the convolutions)",
          "use_dora": "DoRA (weight-decomposed, any network type)", "network_type": "Network type", "v_parameterization": "V-prediction model",
          "init_lora_weights": "Continue from a LoRA file", "resume_from_checkpoint": "Resume from checkpoint folder",
          "log_with": "Training log", "overwrite": "Replace an existing LoRA of the same name"}
# Words of config keys as a person says them (labels); the key itself is in each field's tooltip.
WORDS = {"lora": "LoRA", "lr": "LR", "snr": "SNR", "vae": "VAE", "dora": "DoRA", "reso": "resolution", "n": "N",
         "te": "TE", "clip": "CLIP", "cfg": "CFG", "aug": "augmentation", "dir": "folder", "8bit": "8-bit",
         "fp8": "FP8", "nf4": "NF4", "t5xxl": "T5-XXL"}
# Tooltips that would mention the CLI's text-generation mode
TAB_HELP = {"init_lora_weights": "continue training an existing LoRA .safetensors file (same family and rank)",
            "target_modules": "module names to adapt (default: kohya's targets)"}


def network_types_text() -> str:
    """The network types, one line each, for the tab (Markdown)."""
    lines = [f"- **{name}**: {text.split(': ', 1)[1]}" for name, text in NETWORK_TYPES.items()]
    return ("Network types (all four, and DoRA on each, load in AUTOMATIC1111 and Forge; diffusers' "
            "`load_lora_weights` reads only lora / locon without DoRA):\n" + "\n".join(lines))


def label_of(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    words = [WORDS.get(w, w) for w in key.split("_")]
    text = " ".join(words)
    return text[0].upper() + text[1:]


@dataclass(frozen=True)
class FieldSpec:
    key: str
    kind: str               # bool | choice | int | text
    help: str
    group: str
    default: Any
    choices: Optional[tuple] = None
    optional: bool = False
    text_only: bool = False  # a str field: its text is taken as is, never parsed as YAML

    @property
    def label(self) -> str:
        return label_of(self.key)

    @property
    def tooltip(self) -> str:
        return f"{TAB_HELP.get(self.key, self.help)} (YAML key: {self.key})"

    @property
    def elem_id(self) -> str:
        return f"lora_trainer_cfg_{self.key}"


def _types(hint) -> tuple[list, bool]:
    if get_origin(hint) is Union:
        args = list(get_args(hint))
        optional = type(None) in args
        return [a for a in args if a is not type(None)], optional
    return [hint], False


def field_specs() -> list[FieldSpec]:
    hints = get_type_hints(TrainConfig)
    specs = []
    for key, meta in field_meta().items():
        if key in MANAGED_ELSEWHERE or key in TEXT_GENERATION_KEYS:
            continue
        types, optional = _types(hints[key])
        choices = tuple(meta["choices"]) if meta.get("choices") else None
        if types == [bool]:
            kind = "bool"
        elif choices:
            kind = "choice"
        elif types == [int] and not optional:
            kind = "int"
        else:
            kind = "text"
        specs.append(FieldSpec(key, kind, meta.get("help", ""), meta.get("group", "advanced"), meta["default"],
                               choices, optional, text_only=(types == [str])))
    return specs


def basic_specs() -> list[FieldSpec]:
    specs = [s for s in field_specs() if s.group == "basic"]
    order = {k: i for i, k in enumerate(BASIC_ORDER)}
    return sorted(specs, key=lambda s: order.get(s.key, len(order)))


def advanced_specs() -> list[FieldSpec]:
    return [s for s in field_specs() if s.group != "basic"]


# ---- values --------------------------------------------------------------------------------------------
def to_widget(spec: FieldSpec, value: Any):
    """A config value as its widget shows it."""
    if spec.kind == "bool":
        return bool(value)
    if spec.kind == "choice":
        return str(value)
    if spec.kind == "int":
        return int(value) if value is not None else spec.default
    if value is None:
        return ""
    if spec.key == "sample_prompts" and isinstance(value, list):
        return "\n".join(str(v) for v in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON is YAML flow style: it reads back the same
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def from_widget(spec: FieldSpec, raw: Any):
    """A widget's value as a config value (from_dict then coerces and validates it)."""
    if spec.kind == "bool":
        return bool(raw)
    if spec.kind == "choice":
        return raw if raw not in (None, "") else spec.default
    if spec.kind == "int":
        if raw in (None, ""):
            return spec.default
        return int(raw) if float(raw).is_integer() else raw
    text = "" if raw is None else str(raw)
    if spec.key == "sample_prompts":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines or None
    if not text.strip():
        return None if spec.optional else ("" if spec.text_only else spec.default)
    if spec.text_only:
        return text if spec.key in ("caption_prefix", "caption_suffix") else text.strip()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()


def form_to_config(values: dict[str, Any], extra: Optional[dict[str, Any]] = None) -> TrainConfig:
    """Widget values by key (+ extra keys such as train_data_dir) -> a validated TrainConfig."""
    specs = {s.key: s for s in field_specs()}
    data = {k: from_widget(specs[k], v) for k, v in values.items() if k in specs}
    data.update({k: v for k, v in (extra or {}).items() if v not in (None, "")})
    return from_dict(data, source="the form")


def config_to_form(cfg: Union[TrainConfig, dict]) -> dict[str, Any]:
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    specs = {s.key: s for s in field_specs()}
    return {k: to_widget(specs[k], v) for k, v in data.items() if k in specs}
