"""Autotag: caption a folder of images with a CLIP zero-shot tagger or a WebUI host's interrogator.

Public API (torch, transformers and open_clip are imported only when a tagger is built):
    autotag_folder(folder, *, tagger, threshold, prefix, mode, destination, policy, progress) -> AutotagResult
    make_tagger(name=None, *, host=None, model=None, device="auto") -> Tagger
    available_taggers(host=None) -> [TaggerInfo]
    ClipTagger(backend, vocabulary=None), HostInterrogatorTagger(name, fn, kind)
    load_backend(spec, device="auto"), load_vocabulary(folder=None)
The CLI lives in `caption.cli` (add_caption_arguments, run_caption).
"""
from .autotag import AutotagResult, FileResult, autotag_folder
from .backends import DEFAULT_MODEL, OpenClipBackend, TaggerUnavailable, TransformersClipBackend, load_backend
from .taggers import ClipTagger, HostInterrogatorTagger, Tagger, TaggerInfo, available_taggers, make_tagger
from .vocab import Vocabulary, VocabularyError, load_vocabulary

__all__ = [
    "AutotagResult", "FileResult", "autotag_folder", "DEFAULT_MODEL", "OpenClipBackend", "TaggerUnavailable",
    "TransformersClipBackend", "load_backend", "ClipTagger", "HostInterrogatorTagger", "Tagger", "TaggerInfo",
    "available_taggers", "make_tagger", "Vocabulary", "VocabularyError", "load_vocabulary",
]
