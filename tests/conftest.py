"""Shared fixtures: tiny real models (built in code, offline) and small generated datasets."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    if "LORA_TRAINER_CACHE" not in os.environ:
        os.environ["LORA_TRAINER_CACHE"] = str(tmp_path_factory.mktemp("lt-cache"))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Original-format single files (+ .yaml) for SD1, SD2 (v-prediction) and SDXL."""
    from lora_trainer.models.tiny import write_tiny_single_file

    root = tmp_path_factory.mktemp("models")
    return {
        "sd1": write_tiny_single_file(root / "tiny-sd1.safetensors", "sd1"),
        "sd2": write_tiny_single_file(root / "tiny-sd2-v.safetensors", "sd2", v_prediction=True),
        "sdxl": write_tiny_single_file(root / "tiny-sdxl.safetensors", "sdxl"),
    }


@pytest.fixture(scope="session")
def tiny_folders(tiny_files, tmp_path_factory):
    """The same models as diffusers folders."""
    from lora_trainer.models.loader import load_single_file
    from lora_trainer.models.tiny import write_diffusers_folder

    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for family, path in tiny_files.items():
        model = load_single_file(path, log_fn=lambda *_: None)
        out[family] = write_diffusers_folder(model, root / path.stem)
    return out


def make_images(folder: Path, n: int = 6, seed: int = 0, sizes=((64, 64), (96, 64), (64, 96))) -> Path:
    """Small coloured images with sidecar captions."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue"]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        colour = colours[i % 3]
        img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        d = ImageDraw.Draw(img)
        d.rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill={"red": (220, 20, 20), "green": (20, 200, 20),
                                                                    "blue": (20, 20, 220)}[colour])
        img.save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"{colour} square, simple background, sample {i}")
    return folder


@pytest.fixture
def image_dir(tmp_path):
    return make_images(tmp_path / "data")


def base_config(**overrides):
    from lora_trainer.config import from_dict

    cfg = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32,
           "batch_size": 2, "lora_rank": 4, "learning_rate": 1e-3, "log_with": "none", "seed": 3}
    cfg.update(overrides)
    return from_dict(cfg)
