"""Caption text: tag lists, prefix (trigger word) placement, merging with existing captions, sentences."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

# Nouns the sentence builder writes without "a"/"an" (besides plurals ending in -s).
_NO_ARTICLE = {"people", "food", "fruit", "grass", "water", "ice", "fire", "smoke", "snow", "rain", "lightning",
               "jewelry", "armor", "coffee", "wine", "bread", "sushi", "text", "bow and arrow"}
_AN_EXCEPTIONS = ("uni", "use", "eu", "one")


def split_tags(caption: str) -> list[str]:
    """'a, b ,, c' -> ['a', 'b', 'c'] (whitespace collapsed, empty parts dropped). Line breaks separate
    tags too, as when the dataset reads a multi-line caption file."""
    return [" ".join(p.split()) for p in caption.replace("\r", "\n").replace("\n", ",").split(",") if p.strip()]


def _key(tag: str) -> str:
    # "long_hair" and "Long hair" are the same tag.
    return " ".join(tag.replace("_", " ").lower().split())


def dedupe(tags: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for tag in tags:
        k = _key(tag)
        if k and k not in seen:
            seen.add(k)
            out.append(tag)
    return out


def compose(new_tags: Sequence[str], prefix: str = "", existing: Optional[str] = None) -> str:
    """The caption to write: prefix tags first, then the existing caption's tags (append), then new tags not
    already there. Without `existing` this is prefix + new tags."""
    parts = split_tags(prefix) + (split_tags(existing) if existing else []) + [" ".join(t.split()) for t in new_tags]
    return ", ".join(dedupe(parts))


def with_article(term: str) -> str:
    low = term.lower()
    if low in _NO_ARTICLE or (low.endswith("s") and not low.endswith("ss")):
        return term
    vowel = low[:1] in "aeiou" and not low.startswith(_AN_EXCEPTIONS)
    return ("an " if vowel else "a ") + term


def sentence(scored: Sequence[tuple[str, float]], category_of: Mapping[str, str], threshold: float) -> str:
    """A short caption from the best tags: "a photo of a cat, watercolor painting, anime style, soft lighting".

    The subject is the best-scoring subject term even below the threshold (a caption needs one); medium,
    style and lighting are the best term of their category when it reaches the threshold."""
    best: dict[str, tuple[str, float]] = {}
    for tag, score in scored:
        category = category_of.get(tag)
        if category and category not in best:
            best[category] = (tag, score)

    def above(category: str) -> Optional[str]:
        hit = best.get(category)
        return hit[0] if hit and hit[1] >= threshold else None

    subject = best.get("subjects", (None, 0.0))[0]
    medium, style, lighting = above("mediums"), above("styles"), above("lighting")
    photo = medium is not None and "photo" in medium
    head = ("a photo" if photo else "a picture") + (f" of {with_article(subject)}" if subject else "")
    parts = [head]
    if medium and not photo:
        parts.append(medium)
    if style:
        parts.append(f"{style} style")
    if lighting:
        parts.append(lighting)
    return ", ".join(parts)
