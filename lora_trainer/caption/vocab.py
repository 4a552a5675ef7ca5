"""The tag vocabulary of the zero-shot tagger: one `.txt` file per category in `caption/vocab/`.

File format (so people can curate their own lists, `--vocab FOLDER`):
- one term per line; blank lines are ignored; a line starting with `#` is a comment;
- `# template: a picture of {}` sets the text prompt a term is scored with (`{}` is the term);
- `# neutral: a picture` sets the category's neutral prompt, the "none of these" alternative a term has to
  beat (see `scoring.py`).
A term may appear in one category only, so a tag always maps back to one category.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

VOCAB_DIR = Path(__file__).with_name("vocab")
# Categories the caption sentence is built from, and the order files are read in; other files follow
# alphabetically.
CATEGORY_ORDER = ("subjects", "mediums", "styles", "lighting", "colors", "composition", "quality")
DEFAULT_TEMPLATE = "a picture, {}"
DEFAULT_NEUTRAL = "a picture"


class VocabularyError(ValueError):
    """A vocabulary folder or file a person has to fix; the message names the file and line."""


@dataclass(frozen=True)
class Category:
    name: str
    terms: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    neutral: str = DEFAULT_NEUTRAL

    def prompt(self, term: str) -> str:
        return self.template.replace("{}", term)


@dataclass(frozen=True)
class Vocabulary:
    categories: tuple[Category, ...]

    @property
    def terms(self) -> list[str]:
        return [t for c in self.categories for t in c.terms]

    @property
    def category_of(self) -> dict[str, str]:
        return {t: c.name for c in self.categories for t in c.terms}

    def __len__(self) -> int:
        return sum(len(c.terms) for c in self.categories)


def _normalise(term: str) -> str:
    return " ".join(term.split())


def parse_category(name: str, text: str, source: str = "<text>") -> Category:
    terms: list[str] = []
    seen: dict[str, int] = {}
    template, neutral = DEFAULT_TEMPLATE, DEFAULT_NEUTRAL
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            key, _, value = body.partition(":")
            if key.strip().lower() == "template":
                template = value.strip()
                if template.count("{}") != 1:
                    raise VocabularyError(f"{source}:{lineno}: the template must contain '{{}}' exactly once "
                                          f"(where the term goes), got {template!r}")
            elif key.strip().lower() == "neutral":
                neutral = value.strip()
                if not neutral:
                    raise VocabularyError(f"{source}:{lineno}: the neutral prompt is empty")
            continue
        term = _normalise(line)
        key = term.lower()
        if key in seen:
            raise VocabularyError(f"{source}:{lineno}: {term!r} is listed twice (first on line {seen[key]})")
        if "," in term:
            raise VocabularyError(f"{source}:{lineno}: {term!r} contains a comma, which separates tags in "
                                  "captions; write it without one")
        seen[key] = lineno
        terms.append(term)
    return Category(name=name, terms=tuple(terms), template=template, neutral=neutral)


def load_vocabulary(folder: Optional[Union[str, Path]] = None, categories: Optional[list[str]] = None) -> Vocabulary:
    """Reads every `*.txt` in `folder` (default: the vocabulary shipped with lora-trainer).

    categories: only these files (by stem), e.g. ["subjects", "styles"].
    """
    if folder is None:
        return _default_vocabulary(tuple(categories) if categories else None)
    return _load(Path(folder), categories)


@lru_cache(maxsize=4)
def _default_vocabulary(categories: Optional[tuple[str, ...]]) -> Vocabulary:
    return _load(VOCAB_DIR, list(categories) if categories else None)


def _load(folder: Path, categories: Optional[list[str]]) -> Vocabulary:
    if not folder.is_dir():
        raise VocabularyError(f"vocabulary folder {folder} does not exist")
    files = {p.stem: p for p in folder.glob("*.txt")}
    if not files:
        raise VocabularyError(f"vocabulary folder {folder} holds no .txt files (one file per category, "
                              "one term per line)")
    if categories:
        missing = [c for c in categories if c not in files]
        if missing:
            raise VocabularyError(f"no vocabulary file for {missing} in {folder}; there are: {sorted(files)}")
        files = {c: files[c] for c in categories}
    order = [c for c in CATEGORY_ORDER if c in files] + sorted(c for c in files if c not in CATEGORY_ORDER)
    loaded: list[Category] = []
    owner: dict[str, str] = {}
    for name in order:
        path = files[name]
        category = parse_category(name, path.read_text(encoding="utf-8-sig"), source=str(path))
        for term in category.terms:
            other = owner.setdefault(term.lower(), name)
            if other != name:
                raise VocabularyError(f"{path}: {term!r} is also in {other}.txt; a term may be in one category only")
        if category.terms:
            loaded.append(category)
    if not loaded:
        raise VocabularyError(f"the vocabulary files in {folder} contain no terms")
    return Vocabulary(categories=tuple(loaded))
