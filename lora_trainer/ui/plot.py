"""A small loss-curve picture drawn with PIL (no plotting library: the same PNG on every Gradio version)."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(points: Sequence[tuple[int, float]], total_steps: Optional[int] = None, width: int = 560,
               height: int = 220):
    """PIL image: raw loss (light) and its moving average (dark) over steps; None when there is nothing yet."""
    from PIL import Image, ImageDraw

    pts = [(int(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
    if not pts:
        return None
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 52, 12, 12, 28
    pw, ph = width - left - right, height - top - bottom
    x_max = max(total_steps or 0, pts[-1][0], 1)
    x_min = min(pts[0][0], x_max - 1) if len(pts) > 1 else 0
    vals = [v for _, v in pts]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x_min) / max(x_max - x_min, 1) * pw
        y = top + (1 - (value - lo) / (hi - lo)) * ph
        return x, y

    d.rectangle([left, top, left + pw, top + ph], outline=(180, 180, 180))
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        _, y = xy(x_min, v)
        d.line([left, y, left + pw, y], fill=(235, 235, 235))
        d.text((4, y - 6), f"{v:.3g}", fill=(90, 90, 90))
    d.text((left, height - bottom + 8), f"step {x_min}", fill=(90, 90, 90))
    d.text((left + pw - 70, height - bottom + 8), f"step {x_max}", fill=(90, 90, 90))
    if len(pts) == 1:
        x, y = xy(*pts[0])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(40, 90, 200))
        return img
    d.line([xy(s, v) for s, v in pts], fill=(170, 195, 240), width=1)
    avg = smooth(vals, max(1, len(vals) // 20))
    d.line([xy(s, v) for (s, _), v in zip(pts, avg)], fill=(30, 70, 180), width=2)
    return img
