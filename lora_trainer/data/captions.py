"""Caption text: reading it from files, and the per-draw processing (trigger words, shuffle, dropout).

Randomness comes only from the `random.Random` passed in, which the dataset derives from
(seed, epoch, index, position), so a resumed run sees exactly the same captions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable


def split_tags(caption: str) -> list[str]:
    """'a, b ,, c' -> ['a', 'b', 'c']"""
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_parts(parts: Iterable[str]) -> str:
    """Joins caption pieces with ', ' without doubled commas or empty pieces: ('tok,', '', 'a') -> 'tok, a'."""
    cleaned = [p.strip().strip(",").strip() for p in parts if p]
    return ", ".join(p for p in cleaned if p)


def normalize_caption(text: str) -> str:
    """File text -> one line: surrounding blanks dropped, several lines joined like tags."""
    return join_parts(line for line in text.replace("\r", "\n").split("\n"))


@dataclass(frozen=True)
class CaptionOptions:
    prefix: str = ""
    suffix: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "CaptionOptions":
        return cls(prefix=cfg.caption_prefix or "", suffix=cfg.caption_suffix or "",
                   shuffle=bool(cfg.shuffle_caption), keep_tokens=int(cfg.keep_tokens),
                   tag_dropout=float(cfg.caption_tag_dropout_rate),
                   caption_dropout=float(cfg.caption_dropout_rate))

    @property
    def is_random(self) -> bool:
        return self.shuffle or self.tag_dropout > 0 or self.caption_dropout > 0

    @property
    def rearranges(self) -> bool:
        """Whether a caption's text changes from draw to draw (beyond dropout's empty caption)."""
        return self.shuffle or self.tag_dropout > 0


def caption_forms(caption: str, options: CaptionOptions) -> list[str]:
    """Every text a draw of `caption` can give, when there are few: the caption with its trigger words, and ""
    with caption dropout. Shuffling and tag dropout give too many: ValueError."""
    if options.rearranges:
        raise ValueError("shuffled or tag-dropped captions have too many forms to list")
    forms = [process_caption(caption, CaptionOptions(options.prefix, options.suffix), random.Random(0))]
    return forms + ([""] if options.caption_dropout > 0 else [])


def _without_leading(caption: str, prefix: str) -> str:
    """A caption that starts with the trigger word already (written by an autotag or by hand) does not get it
    twice, and keep_tokens keeps counting the caption's own tags."""
    lead = split_tags(prefix)
    tags = split_tags(caption)
    if lead and tags[:len(lead)] == lead:
        return join_parts(tags[len(lead):])
    return caption


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """One draw of a caption.

    keep_tokens counts tags of the caption itself; the prefix and suffix (trigger words) are never shuffled
    or tag-dropped. Caption dropout empties everything, prefix included: it trains the unconditional case.
    """
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    body = _without_leading(caption, options.prefix)
    if options.shuffle or options.tag_dropout > 0:
        # Only split into tags when they are rearranged, so prose like "1,000 birds" stays intact otherwise.
        tags = split_tags(body)
        kept, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
        if options.tag_dropout > 0:
            rest = [t for t in rest if rng.random() >= options.tag_dropout]
        if options.shuffle:
            rng.shuffle(rest)
        body = join_parts(kept + rest)
    return join_parts([options.prefix, body, options.suffix])
