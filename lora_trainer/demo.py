"""`python -m lora_trainer demo`: the quick start that needs no download.

Trains on the sample images bundled in the package (lora_trainer/demo_data) against a built-in tiny
base model with random weights, so the whole pipeline runs offline in about a minute on a CPU. The
resulting file is a real kohya-format LoRA of that tiny model; for a useful LoRA point `base_model`
at a real checkpoint (see configs/).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import TrainConfig, from_dict


def demo_data_dir() -> Path:
    return Path(str(resources.files("lora_trainer").joinpath("demo_data")))


def demo_config(output_dir: Path, family: str = "sd1", steps: int = 60) -> TrainConfig:
    from .models.tiny import ensure_tiny_model

    output_dir = Path(output_dir).resolve()
    base = ensure_tiny_model(output_dir / "base_model", family)
    return from_dict({
        "base_model": str(base),
        "train_data_dir": str(demo_data_dir()),
        "output_dir": str(output_dir),
        "output_name": f"demo_{family}",
        "resolution": 64,
        "min_bucket_reso": 64,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 32,
        "batch_size": 2,
        "max_train_steps": steps,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_alpha": 4,
        "save_steps": max(steps // 2, 1),
        "caption_prefix": "",
        "sample_prompts": ["lt_ball, red ball, blue background"],
        "sample_steps": 4,
        "overwrite": True,
        "seed": 1,
    }, source="demo")
