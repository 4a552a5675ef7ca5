"""Taggers: anything that turns images into scored tags, behind one small interface.

- `ClipTagger`: zero-shot CLIP over our curated vocabulary (`vocab/*.txt`), probabilities as documented in
  `scoring.py`.
- `HostInterrogatorTagger`: wraps a WebUI host's interrogator (BLIP caption, CLIP interrogator, DeepBooru),
  i.e. any callable PIL image -> str.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

from .backends import DEFAULT_MODEL, ClipBackend, TaggerUnavailable, load_backend
from .scoring import category_probabilities, rank
from .vocab import Vocabulary, load_vocabulary

Scored = list[tuple[str, float]]


@runtime_checkable
class Tagger(Protocol):
    name: str

    def tag(self, images: list) -> list[Scored]:
        """For each PIL image, (tag, score in [0, 1]) pairs, highest score first."""
        ...


class ClipTagger:
    """CLIP zero-shot tagging: every vocabulary term is scored against every image.

    `tag()` returns all terms with their probability (highest first); `autotag` applies the threshold.
    `category_of` maps a term to its category, which caption mode uses to build a sentence.
    """

    kind = "tags"

    def __init__(self, backend: ClipBackend, vocabulary: Optional[Vocabulary] = None, *, text_batch_size: int = 256):
        self.backend = backend
        self.vocabulary = vocabulary or load_vocabulary()
        self.name = f"clip ({backend.name})"
        self.text_batch_size = text_batch_size
        self.terms = self.vocabulary.terms
        self.category_of = self.vocabulary.category_of
        self._text = None  # (term_emb, neutral_emb, term_category), computed on first use

    @property
    def input_size(self):
        """The side length the model sees images at (None when unknown)."""
        return getattr(self.backend, "image_size", None)

    def _text_embeddings(self):
        if self._text is None:
            import torch

            prompts = [c.prompt(t) for c in self.vocabulary.categories for t in c.terms]
            neutrals = [c.neutral for c in self.vocabulary.categories]
            texts = prompts + neutrals
            chunks = [self.backend.encode_texts(texts[i:i + self.text_batch_size])
                      for i in range(0, len(texts), self.text_batch_size)]
            emb = torch.cat(chunks)
            category = torch.tensor([i for i, c in enumerate(self.vocabulary.categories) for _ in c.terms])
            self._text = (emb[:len(prompts)], emb[len(prompts):], category)
        return self._text

    def probabilities(self, images: list):
        """(N, M) tensor: p(term | image) for the terms in `self.terms` order."""
        term_emb, neutral_emb, category = self._text_embeddings()
        image_emb = self.backend.encode_images(images).to(term_emb.device)
        return category_probabilities(image_emb, term_emb, neutral_emb, category.to(term_emb.device),
                                      self.backend.logit_scale)

    def tag(self, images: list) -> list[Scored]:
        if not images:
            return []
        probs = self.probabilities(images).cpu().tolist()
        return [rank(self.terms, row) for row in probs]


_WEIGHTED = re.compile(r"^\((.+):\s*([0-9]*\.?[0-9]+)\)$")


def parse_tag_string(text: str) -> Scored:
    """'a, (b:0.8), c' -> [('a', 1.0), ('b', 0.8), ('c', 1.0)], highest first (DeepBooru's output, which may
    carry scores when the WebUI is set to return them); escaped brackets `\\(` are unescaped."""
    out: Scored = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        score = 1.0
        m = _WEIGHTED.match(part)
        if m:
            part, score = m.group(1).strip(), float(m.group(2))
        part = part.replace("\\(", "(").replace("\\)", ")")
        out.append((part, score))
    return sorted(out, key=lambda ts: -ts[1])


class TagFailed:
    """A tagger's per-image failure, in place of that image's tags."""

    def __init__(self, reason: str):
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class HostInterrogatorTagger:
    """Adapter for a WebUI host's interrogator: `fn(PIL image) -> str`.

    kind "caption" (BLIP, CLIP interrogator): the whole string is one item with score 1.0.
    kind "tags" (DeepBooru): the string is split on commas; `(tag:0.87)` carries a score, others get 1.0.
    """

    def __init__(self, name: str, interrogate: Callable[[Any], str], kind: str = "caption"):
        if kind not in ("caption", "tags"):
            raise ValueError(f"kind must be 'caption' or 'tags', got {kind!r}")
        self.name = name
        self.kind = kind
        self._fn = interrogate

    def tag(self, images: list) -> list:
        """One entry per image: its scored tags, or a TagFailed saying why the host's captioner gave nothing
        usable (a failure must never become a caption)."""
        results: list = []
        for image in images:
            try:
                text = self._fn(image)
            except Exception as e:  # the host's model failed (offline, missing weights ...)
                results.append(TagFailed(f"the WebUI's {self.name} failed ({type(e).__name__}); it may need to "
                                         f"download its model first: see the WebUI console, or use the built-in "
                                         f"CLIP tagger"))
                continue
            text = "" if text is None else str(text).strip()
            if text.lower().startswith("<error"):  # A1111's interrogator returns this string instead of raising
                results.append(TagFailed(f"the WebUI's {self.name} reported an error (offline, or its model is "
                                         f"missing: see the WebUI console); no caption written"))
                continue
            if self.kind == "tags":
                results.append(parse_tag_string(text))
            else:
                results.append([(text, 1.0)] if text else [])
        return results


@dataclass(frozen=True)
class TaggerInfo:
    name: str
    description: str
    available: bool
    reason: str = ""  # why it cannot run, when it cannot


def _host_interrogators(host) -> Mapping[str, Callable]:
    if host is None:
        return {}
    if isinstance(host, Mapping):
        return host
    getter = getattr(host, "interrogators", None)
    found = getter() if callable(getter) else None
    return found or {}


def _host_kind(name: str) -> str:
    return "tags" if "booru" in name.lower() or "tagger" in name.lower() else "caption"


def _open_clip_status() -> tuple[bool, str]:
    from .backends import import_open_clip

    try:
        import_open_clip()
        return True, ""
    except TaggerUnavailable as e:
        return False, str(e)


def available_taggers(host=None) -> list[TaggerInfo]:
    """What can tag here: the open_clip tagger, the transformers CLIP tagger and the host's interrogators.

    host: an object with `interrogators() -> {name: fn(PIL image) -> str}` (see hosts/base.py), or that
    mapping itself. "clip" and "clip-hf" need their weights once (downloaded on first use)."""
    infos = []
    ok, why = _open_clip_status()
    infos.append(TaggerInfo("clip", f"CLIP zero-shot over the tag vocabulary ({DEFAULT_MODEL})", ok, why))
    try:
        import transformers  # noqa: F401

        ok, why = True, ""
    except Exception as e:  # pragma: no cover - transformers is a hard dependency
        ok, why = False, f"transformers cannot be imported: {e}"
    infos.append(TaggerInfo("clip-hf", "CLIP zero-shot with transformers (hf:openai/clip-vit-base-patch32)", ok, why))
    for name in _host_interrogators(host):
        infos.append(TaggerInfo(name, f"the WebUI's {name} ({_host_kind(name)})", True))
    return infos


def make_tagger(name: Optional[str] = None, *, host=None, model: Optional[str] = None,
                device: Optional[str] = "auto", vocabulary: Optional[Vocabulary] = None) -> Tagger:
    """A tagger by name ("clip", "clip-hf" or a host interrogator's name) or by CLIP model spec (`model`).

    Raises TaggerUnavailable with what to do when it cannot run."""
    interrogators = _host_interrogators(host)
    if name in interrogators:
        return HostInterrogatorTagger(name, interrogators[name], _host_kind(name))
    if name in (None, "", "clip"):
        spec = model
    elif name == "clip-hf":
        spec = model if model and model.startswith("hf:") else "hf:openai/clip-vit-base-patch32"
    else:
        known = ["clip", "clip-hf", *interrogators]
        raise TaggerUnavailable(f"unknown tagger {name!r}; available: {', '.join(known)}")
    return ClipTagger(load_backend(spec, device=device), vocabulary)
