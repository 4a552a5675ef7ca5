"""Autotag throughput: images/s of `autotag_folder` on generated images, with a tiny random CLIP by default.

    python bench/bench_autotag.py [--images 200] [--batch-size 16] [--model hf:FOLDER_OR_ID] [--device cpu]

Prints, side by side in one run: the whole autotag at the chosen batch size and at batch size 1 (the
reference), and the per-stage cost (image decode, our preprocessing vs transformers' CLIPImageProcessor,
CLIP image encoder + scoring). The tiny model makes the numbers mostly about I/O and preprocessing; pass a
real model to measure the encoder too.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lora_trainer.caption import ClipTagger, autotag_folder, load_backend  # noqa: E402
from lora_trainer.caption.backends import preprocess_images  # noqa: E402
from lora_trainer.caption.images import list_images, load_image  # noqa: E402
from lora_trainer.caption.testing import tiny_clip_backend  # noqa: E402


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random pictures (gradients plus blobs) of assorted sizes, half PNG, half JPEG."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(256, 769)), int(rng.integers(256, 769))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.random(3) * 255
        img = base + 60 * np.sin(xx[..., None] / rng.uniform(20, 80) + rng.random(3) * 6) \
            + 60 * np.cos(yy[..., None] / rng.uniform(20, 80) + rng.random(3) * 6)
        arr = np.clip(img, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:04d}.{'png' if i % 2 else 'jpg'}", quality=90)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="CLIP model spec (default: a tiny random CLIP)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    backend, load_s = timed(lambda: load_backend(args.model, device=args.device) if args.model
                            else tiny_clip_backend(device=args.device))
    tagger = ClipTagger(backend)
    _, text_s = timed(tagger._text_embeddings)
    print(f"model {backend.name} on {args.device} ({torch.get_num_threads()} torch threads): loaded in {load_s:.1f} s; {len(tagger.terms)} vocabulary prompts encoded "
          f"in {text_s:.2f} s (once per tagger)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, gen_s = timed(lambda: make_images(folder, args.images))
        print(f"{args.images} generated images (256-768 px, PNG and JPEG) in {gen_s:.1f} s")
        paths = list_images(folder)

        rows = []
        for batch_size in (args.batch_size, 1):
            result = autotag_folder(folder, tagger=tagger, batch_size=batch_size, policy="overwrite",
                                    threshold=0.3)
            assert result.failed == 0 and result.tagged == len(paths)
            rows.append((f"autotag_folder, batch {batch_size}", result.seconds, result.images_per_second))

        size = tagger.input_size or 224
        images, decode_s = timed(lambda: [load_image(p, min_side=size) for p in paths])
        _, ours_s = timed(lambda: [preprocess_images(images[i:i + 16], size)
                                   for i in range(0, len(images), 16)])
        try:
            from transformers import CLIPImageProcessor

            reference = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
            _, ref_s = timed(lambda: [reference(images=images[i:i + 16], return_tensors="pt")
                                      for i in range(0, len(images), 16)])
        except Exception as e:  # a transformers without a usable image processor
            ref_s = float("nan")
            print(f"(CLIPImageProcessor unavailable: {e})")
        _, score_s = timed(lambda: [tagger.tag(images[i:i + 16]) for i in range(0, len(images), 16)])

    n = len(paths)
    print(f"\n{'what':44s} {'seconds':>8s} {'images/s':>9s}")
    for name, seconds, rate in rows:
        print(f"{name:44s} {seconds:8.2f} {rate:9.1f}")
    for name, seconds in (("  decode (data.load_image, JPEG draft)", decode_s),
                          ("  preprocess: ours (PIL + torch)", ours_s),
                          ("  preprocess: CLIPImageProcessor (reference)", ref_s),
                          ("  encode + score (incl. our preprocess)", score_s)):
        print(f"{name:44s} {seconds:8.2f} {n / seconds if seconds == seconds and seconds > 0 else float('nan'):9.1f}")


if __name__ == "__main__":
    main()
