"""From CLIP embeddings to per-tag probabilities.

How a score becomes a probability (what `threshold` means):
for an image x and a category c (subjects, styles, ...) with terms t_1..t_n and neutral prompt u_c,

    logit(t_i) = s * cos(x, prompt(t_i)),    logit(none) = s * cos(x, u_c)
    p(t_i)     = softmax over {none, t_1, ..., t_n}  evaluated at t_i

where s is the model's own learned logit scale (exp(logit_scale), 100 for OpenAI's and LAION's CLIP
models), the temperature CLIP was trained with. This is CLIP's standard zero-shot classification with one
extra class, "none of these" (the neutral prompt, e.g. "a picture"): a term gets probability mass only as
far as it describes the image better than saying nothing does. Within a category the probabilities and
p(none) add up to 1, so `threshold=0.3` keeps at most three terms per category and none at all when the
category has nothing to say about the image (p(none) dominant). Scores are comparable across images and
across categories of similar size.
"""
from __future__ import annotations

from typing import Optional, Sequence


def category_probabilities(image_emb, term_emb, neutral_emb, term_category, logit_scale: float):
    """image_emb (N, D), term_emb (M, D), neutral_emb (C, D): L2-normalised embeddings.
    term_category (M,): the index (0..C-1) of each term's category. Returns p (N, M) as defined above."""
    import torch

    term_category = torch.as_tensor(term_category, device=term_emb.device)
    term_logits = logit_scale * image_emb @ term_emb.T  # (N, M)
    none_logits = logit_scale * image_emb @ neutral_emb.T  # (N, C)
    probs = torch.empty_like(term_logits)
    for c in range(neutral_emb.shape[0]):
        idx = (term_category == c).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        logits = torch.cat([none_logits[:, c:c + 1], term_logits[:, idx]], dim=1)
        probs[:, idx] = logits.softmax(dim=1)[:, 1:]
    return probs


def rank(terms: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """(term, score) pairs, highest score first; ties keep vocabulary order."""
    order = sorted(range(len(terms)), key=lambda i: -scores[i])
    return [(terms[i], float(scores[i])) for i in order]


def select(scored: Sequence[tuple[str, float]], threshold: float = 0.0,
           top_k: Optional[int] = None) -> list[tuple[str, float]]:
    """Tags with score >= threshold, highest first, at most top_k of them."""
    kept = sorted((ts for ts in scored if ts[1] >= threshold), key=lambda ts: -ts[1])
    return kept[:top_k] if top_k is not None and top_k > 0 else kept
