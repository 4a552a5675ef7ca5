"""`python -m lora_trainer demo`: the quick start that needs no download.

Trains on the sample images bundled in the package (lora_trainer/demo_data) against a built-in tiny
base model with random weights, so the whole pipeline runs offline in about a minute on a CPU. The
resulting file is a real kohya-format LoRA of that tiny model; for a useful LoRA point `base_model`
at a real checkpoint (see configs/).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import ConfigError, TrainConfig, from_dict


def demo_data_dir() -> Path:
    return Path(str(resources.files("lora_trainer").joinpath("demo_data")))


DEMO_STEPS = 60
EXAMPLE_CONFIG = {"sd1": "sd15_character.yaml", "sd2": "sd2_768v_style.yaml", "sdxl": "sdxl_concept.yaml"}


def demo_config(output_dir: Path, family: str = "sd1", steps: int = DEMO_STEPS) -> TrainConfig:
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


def tiny_model_threads() -> None:
    """One CPU thread for the tiny model: its operations are too small to share, and on a busy machine the
    threads' waiting for each other made the demo ten times slower (2:20 instead of 0:16 on two loaded cores).
    An OMP_NUM_THREADS that a person set wins."""
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def export_base(path: Path, family: str = "sd1") -> Path:
    """Writes the demo's tiny base model (the same weights the demo trains on) with its same-named .yaml.

    path: a .safetensors file, or a folder that gets tiny-<family>.safetensors. Existing files are not replaced.
    """
    from .models.tiny import tiny_model_name, write_tiny_single_file

    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        path = path / tiny_model_name(family)
    for p in (path, path.with_suffix(".yaml")):
        if p.exists():
            raise ConfigError(f"--export-base: {p} exists already; choose another path or remove it")
    return write_tiny_single_file(path, family)


def example_config(family: str) -> Path | None:
    """The repository's example config for `family`, where there is one to point at (a checkout's configs/,
    in the current folder or beside the package)."""
    name = EXAMPLE_CONFIG.get(family, EXAMPLE_CONFIG["sd1"])
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / "configs" / name
        if candidate.is_file():
            return candidate
    return None


def next_steps(cfg: TrainConfig, family: str) -> str:
    """The demo's closing hint: only paths that exist and commands that work."""
    base = Path(cfg.base_model)
    lines = [
        "This LoRA fits the tiny demo model only.",
        f"To try your own images offline, train on that tiny model: {base} (with {base.with_suffix('.yaml').name} "
        f"beside it; copy both, or write a copy with: python -m lora_trainer demo --export-base PATH):",
        f"  python -m lora_trainer train --base_model {base} --train_data_dir YOUR_IMAGES --resolution 64 "
        f"--output_dir output/tiny-test",
    ]
    example = example_config(family)
    try:
        shown = example.relative_to(Path.cwd()) if example else None
    except ValueError:
        shown = example
    if shown is not None:
        lines.append(f"For a real LoRA, set base_model to your checkpoint and train_data_dir to your images in "
                     f"{shown}, then: python -m lora_trainer train --config {shown}")
    else:
        lines.append("For a real LoRA, set base_model to your checkpoint (e.g. v1-5-pruned-emaonly.safetensors) and "
                     "train_data_dir to your images: python -m lora_trainer train --base_model CHECKPOINT "
                     "--train_data_dir YOUR_IMAGES (train --help lists every key)")
    return "\n".join(lines)
