"""CLIP backends: what the zero-shot tagger needs from a CLIP model, and two ways to get one.

- `OpenClipBackend` (the default): `open_clip.create_model_and_transforms(arch, pretrained=tag)`; the
  weights come through open_clip's own download mechanism (mostly the Hugging Face hub) and are cached.
- `TransformersClipBackend`: a transformers `CLIPModel` and `CLIPTokenizer` with our own image
  preprocessing (PIL + torch, no torchvision, no CLIPProcessor), for hub models
  (`hf:openai/clip-vit-base-patch32`), local folders and the tiny models of the tests.

Model specs (`--model`):
    open_clip:ViT-B-32/laion2b_s34b_b79k    open_clip architecture / pretrained tag (or a local .pt/.bin file)
    ViT-B-32/laion2b_s34b_b79k              the same (open_clip is the default)
    open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K    an open_clip model straight from the hub
    hf:openai/clip-vit-base-patch32         transformers CLIPModel from the hub or a local folder
torch, transformers and open_clip are imported only when a backend is built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

DEFAULT_MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"
HF_FALLBACK_HINT = ("or use `--model hf:openai/clip-vit-base-patch32`, which needs only transformers "
                    "(no open_clip, no torchvision)")
# OpenAI CLIP's normalisation, used by nearly every CLIP checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TaggerUnavailable(RuntimeError):
    """A tagger that cannot run here; the message says what to install, download or choose instead."""


class ClipBackend(Protocol):
    name: str
    logit_scale: float  # exp of the model's learned logit scale

    def encode_images(self, images: Sequence[Any]):  # list of PIL RGB -> (N, D) float tensor, L2-normalised
        ...

    def encode_texts(self, texts: Sequence[str]):  # -> (M, D) float tensor, L2-normalised
        ...


def resolve_device(device: Optional[str] = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return device


def preprocess_images(images: Sequence[Any], size: int, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD):
    """CLIP's preprocessing: shortest side to `size` (bicubic), centre crop size x size, scale to [0, 1],
    normalise per channel. Returns a (N, 3, size, size) float32 tensor."""
    import numpy as np
    import torch
    from PIL import Image

    bicubic = getattr(Image, "Resampling", Image).BICUBIC
    arrays = []
    for image in images:
        image = image.convert("RGB") if image.mode != "RGB" else image
        w, h = image.size
        short = min(w, h)
        if short != size:
            new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            # reducing_gap: large downscales first shrink by an integer factor (much faster, same look)
            image = image.resize((max(new_w, size), max(new_h, size)), bicubic, reducing_gap=3.0)
            w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        if (w, h) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(image, dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t)


def _normalise(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _pickled_only_hint(folder: Path) -> str:
    """A WebUI's safe unpickler (AUTOMATIC1111's) refuses .bin weights that a newer torch wrote, and transformers
    then fails with an unrelated-looking error: say what works instead."""
    if folder.is_dir() and any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
        return ("; its weights are a pickled .bin, which a WebUI's safe loader may refuse: save the model as "
                "model.safetensors (transformers: model.save_pretrained(folder, safe_serialization=True))")
    return ""


class TransformersClipBackend:
    """A transformers CLIPModel + CLIPTokenizer; images preprocessed by `preprocess_images`."""

    def __init__(self, model, tokenizer, *, device: str = "cpu", name: str = "hf",
                 image_size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.logit_scale = float(model.logit_scale.detach().exp().item())

    @classmethod
    def from_pretrained(cls, repo_or_path: str, *, device: str = "cpu") -> "TransformersClipBackend":
        try:
            from transformers import CLIPModel
        except Exception as e:  # pragma: no cover - transformers is a hard dependency
            raise TaggerUnavailable(f"transformers could not be imported ({e}); `pip install transformers`") from e
        try:
            model = CLIPModel.from_pretrained(repo_or_path)
            tokenizer = _load_tokenizer(repo_or_path)
        except Exception as e:
            local = Path(repo_or_path).exists()
            where = (f"the folder {repo_or_path} must hold a transformers CLIPModel (config.json, weights, "
                     "vocab.json, merges.txt)" + _pickled_only_hint(Path(repo_or_path))) if local else (
                f"'{repo_or_path}' is downloaded from the Hugging Face hub on first use and cached in "
                "~/.cache/huggingface (HF_HOME); check the id and your network, set HF_ENDPOINT for a mirror, "
                f"or download it once while online (`hf download {repo_or_path}`, from huggingface_hub) and run again; "
                "HF_HUB_OFFLINE=1 then uses the cache")
            reason = " ".join(str(e).split()).rstrip(".")
            raise TaggerUnavailable(f"could not load CLIP model {repo_or_path!r} ({type(e).__name__}: {reason}). "
                                    f"{where}") from e
        mean, std, size = _preprocessor_settings(repo_or_path)
        return cls(model, tokenizer, device=device, name=f"hf:{repo_or_path}", image_size=size, mean=mean, std=std)

    def encode_images(self, images):
        import torch

        pixels = preprocess_images(images, self.image_size, self.mean, self.std).to(self.device)
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return _normalise(self.model.visual_projection(pooled)).float()

    def encode_texts(self, texts):
        import torch

        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            return _normalise(self.model.text_projection(pooled)).float()


def _load_tokenizer(repo_or_path: str):
    """CLIPTokenizer (vocab.json + merges.txt); a folder that only has tokenizer.json goes through
    AutoTokenizer."""
    from transformers import AutoTokenizer, CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(repo_or_path)
    except Exception:
        return AutoTokenizer.from_pretrained(repo_or_path)


def _preprocessor_settings(repo_or_path: str) -> tuple[Sequence[float], Sequence[float], Optional[int]]:
    """image_mean / image_std / crop size from the model's preprocessor_config.json when there is one."""
    path = Path(repo_or_path) / "preprocessor_config.json"
    data: dict = {}
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_or_path, "preprocessor_config.json"))
        data = json.loads(path.read_text(encoding="utf-8"))
    except Exception:
        pass  # not every model has one; CLIP's own constants apply
    crop = data.get("crop_size")
    size = crop.get("height") if isinstance(crop, dict) else crop
    return data.get("image_mean", CLIP_MEAN), data.get("image_std", CLIP_STD), size


class OpenClipBackend:
    """An open_clip model; weights fetched by open_clip (`pretrained=` tag, hub id or local file)."""

    def __init__(self, arch: str, pretrained: Optional[str] = None, *, device: str = "cpu"):
        open_clip = import_open_clip()
        self.name = f"open_clip:{arch}" + (f"/{pretrained}" if pretrained else "")
        self.device = device
        _check_open_clip_names(open_clip, arch, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as e:
            raise TaggerUnavailable(
                f"could not load the open_clip model {arch!r} with weights {pretrained!r} "
                f"({type(e).__name__}: {' '.join(str(e).split()).rstrip('.')}). "
                "open_clip downloads the weights on first use (mostly from the Hugging Face hub) and caches them "
                "in ~/.cache/huggingface (HF_HOME). Check your network or set HF_ENDPOINT for a mirror; offline, "
                "run once while online, copy that cache over, or pass a local weights file "
                f"(`--model open_clip:{arch}//path/to/weights.bin`); {HF_FALLBACK_HINT}") from e
        self.model = model.eval()
        size = getattr(getattr(model, "visual", None), "image_size", None)
        self.image_size = max(size) if isinstance(size, (tuple, list)) else size
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.detach().exp().item())

    def encode_images(self, images):
        import torch

        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        with torch.no_grad():
            return _normalise(self.model.encode_image(batch)).float()

    def encode_texts(self, texts):
        import torch

        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return _normalise(self.model.encode_text(tokens)).float()


def import_open_clip():
    try:
        import open_clip
    except Exception as e:  # ImportError, or a torchvision that does not match torch
        try:
            import torch

            torch_version = torch.__version__
        except Exception:  # pragma: no cover
            torch_version = "?"
        from ..keep_torch import INSTALL_OPEN_CLIP, PYTORCH_URL

        raise TaggerUnavailable(
            f"open_clip cannot be imported here ({type(e).__name__}: {e}). It needs torchvision built for your "
            f"torch {torch_version}: install that the way you installed torch ({PYTORCH_URL}), then open_clip "
            f"without letting pip replace either: `{INSTALL_OPEN_CLIP}`; {HF_FALLBACK_HINT}") from e
    return open_clip


def _check_open_clip_names(open_clip, arch: str, pretrained: Optional[str]) -> None:
    if arch.startswith("hf-hub:"):
        return
    models = getattr(open_clip, "list_models", lambda: [])()
    if models and arch not in models:
        raise TaggerUnavailable(f"open_clip has no model {arch!r}; known ones include "
                                f"{', '.join(sorted(models)[:12])} ... (see `open_clip.list_models()`)")
    if pretrained and not Path(pretrained).exists():
        tags_of = getattr(open_clip, "list_pretrained_tags_by_model", None)
        tags = tags_of(arch) if tags_of else []
        if tags and pretrained not in tags:
            raise TaggerUnavailable(f"open_clip has no pretrained weights {pretrained!r} for {arch}; "
                                    f"available: {', '.join(tags)}")


def parse_model_spec(spec: Optional[str]) -> tuple[str, str, Optional[str]]:
    """('open_clip', arch, pretrained) or ('hf', repo_or_path, None); see the module docstring."""
    spec = (spec or DEFAULT_MODEL).strip()
    if spec.startswith("hf:"):
        target = spec[3:].strip()
        if not target:
            raise TaggerUnavailable("`hf:` needs a model id or folder, e.g. hf:openai/clip-vit-base-patch32")
        return "hf", target, None
    if spec.startswith("open_clip:"):
        spec = spec[len("open_clip:"):]
    if spec.startswith("hf-hub:"):
        return "open_clip", spec, None
    arch, _, pretrained = spec.partition("/")
    if not arch:
        raise TaggerUnavailable(f"model spec {spec!r} names no architecture; e.g. {DEFAULT_MODEL}")
    return "open_clip", arch, (pretrained or None)


def load_backend(spec: Optional[str] = None, *, device: Optional[str] = "auto") -> ClipBackend:
    kind, target, pretrained = parse_model_spec(spec)
    device = resolve_device(device)
    if kind == "hf":
        return TransformersClipBackend.from_pretrained(target, device=device)
    return OpenClipBackend(target, pretrained, device=device)
