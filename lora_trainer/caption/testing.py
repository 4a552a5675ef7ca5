"""Tiny random CLIP models for tests and benchmarks (offline, built in code, seconds on CPU).

The tokenizer is the real CLIP BPE vocabulary, built from open_clip's bundled file without importing
open_clip (`lora_trainer.models.tokenizer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .backends import TransformersClipBackend


def tiny_clip_model(seed: int = 0):
    """CLIPModel: text and vision width 32, 2 layers, 32 px images in 8 px patches, 16-d projection."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    config = CLIPConfig(text_config=dict(vocab_size=49408, **common),
                        vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=16)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def tiny_clip_tokenizer():
    from ..models.tokenizer import clip_tokenizer

    return clip_tokenizer()


def tiny_clip_backend(seed: int = 0, device: str = "cpu") -> TransformersClipBackend:
    return TransformersClipBackend(tiny_clip_model(seed), tiny_clip_tokenizer(), device=device, name="hf:tiny")


def save_tiny_clip(folder: Union[str, Path], seed: int = 0) -> Path:
    """Writes the tiny model + tokenizer as a transformers folder, loadable with `--model hf:FOLDER`."""
    folder = Path(folder)
    tiny_clip_model(seed).save_pretrained(folder, safe_serialization=True)  # as hub models ship it; no pickle
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder
