"""CLIP tokenizers without hub access.

Stable Diffusion's tokenizers (SD1's CLIP-L, SD2's and SDXL's OpenCLIP) all use the same byte-level BPE
vocabulary. open_clip ships it as `bpe_simple_vocab_16e6.txt.gz`; we read that file directly (no
`import open_clip`, which needs torchvision) and turn it into the vocab.json / merges.txt pair that
transformers' CLIPTokenizer loads. Fallbacks: a tokenizer folder (diffusers layout) and the
Hugging Face cache of openai/clip-vit-large-patch14, both strictly local.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

from ..config import atomic_write_text

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The vocabulary has 49152 - 256 - 2 merges in use (the rest of the file is unused).
_NUM_MERGES = 49152 - 256 - 2


class TokenizerNotFound(RuntimeError):
    pass


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (the fact CLIP's BPE is built on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable first) is the vocabulary order


def find_bpe_file() -> Optional[Path]:
    """open_clip's BPE file, located through the import system without importing open_clip."""
    override = os.environ.get("LORA_TRAINER_CLIP_BPE")
    if override and Path(override).is_file():
        return Path(override)
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / BPE_FILE
            if candidate.is_file():
                return candidate
    return None


def cache_root() -> Path:
    return Path(os.environ.get("LORA_TRAINER_CACHE", Path.home() / ".cache" / "lora_trainer"))


def tokenizer_files_from_bpe(bpe_file: Path, folder: Path) -> Path:
    """Writes vocab.json, merges.txt and the tokenizer configs into `folder` (once)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    symbols = list(_byte_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}))
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(
        {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"}))
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))  # last: marks completion
    return folder


@lru_cache(maxsize=4)
def _load(folder: str, pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, local_files_only=True)


def clip_tokenizer(folder: Optional[str | Path] = None, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer from `folder` if given, else from open_clip's BPE file, else the local HF cache.

    pad_token: SD1 and SDXL's first encoder pad with <|endoftext|>; SD2 and SDXL's second with "!".
    """
    if folder is not None and (Path(folder) / "vocab.json").is_file():
        return _load(str(folder), pad_token)
    bpe = find_bpe_file()
    if bpe is not None:
        return _load(str(tokenizer_files_from_bpe(bpe, cache_root() / "clip_tokenizer")), pad_token)
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", pad_token=pad_token,
                                             local_files_only=True)
    except Exception:
        pass
    raise TokenizerNotFound(
        "no CLIP tokenizer vocabulary found. Install open_clip_torch (its BPE file is all that is needed: "
        "`pip install --no-deps open_clip_torch` is enough), or set LORA_TRAINER_CLIP_BPE to a "
        f"{BPE_FILE} file, or use a diffusers folder that has a tokenizer/ subfolder.")
