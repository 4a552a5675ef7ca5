"""The memory planner's figures for full-size FLUX.1-dev (12B transformer, T5-XXL, CLIP-L, VAE) on the meta
device, next to what kohya's sd-scripts documents for its Flux LoRA runs. No weights are loaded: any machine.

    python bench/bench_flux_memory.py            # rank 16, batch 1, 8-bit AdamW, 512 / 1024 px, bf16 / fp8
    python bench/bench_flux_memory.py --rank 4 --optimizer adamw

Columns: `frozen TE` is the peak of a run with frozen text encoders (the default: T5 and CLIP encode every caption
first and leave the GPU, which is also how kohya's figures are measured); `TE kept` is a run whose encoders stay on
the GPU (shuffled captions, a trained CLIP). What sd-scripts users report, for comparison:
  - bf16 transformer + gradient checkpointing + cached text encoder outputs at 1024 px (rank 4): more than 26 GB
    (the note on kohya's own example Flux LoRA, which advises adding --fp8_base);
  - 24 GB cards: fp8_base + gradient checkpointing at 1024 px;
  - 16 GB: fp8_base + gradient checkpointing + 512 px + 8-bit AdamW;
  - 12 GB and below: fp8_base plus transformer blocks kept off the GPU (split_mode, later blocks_to_swap);
  - SimpleTuner: an nf4 base from about 9 GB.
The second table is the small-GPU one: gradient checkpointing, frozen text encoders, the transformer in fp8 or
nf4 (nf4_base) with 0-30 blocks' weights in CPU memory (blocks_to_swap, kohya's count).
"""
from __future__ import annotations

import argparse
import itertools
import time

import bench_env  # noqa: F401  (first: offline hubs, passive OpenMP, this checkout importable)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--optimizer", default="adamw8bit", choices=["adamw", "adamw8bit", "adafactor"])
    ap.add_argument("--variant", default="dev", choices=["dev", "schnell"])
    args = ap.parse_args()

    from lora_trainer.config import TrainConfig
    from lora_trainer.models.flux.full_size import full_size_flux
    from lora_trainer.train.memory_plan import GiB, estimate_memory

    model = full_size_flux(args.variant)
    print(f"FLUX.1-{args.variant}, rank {args.rank}, batch 1, {args.optimizer}, VAE fp32, text encoders bf16, CUDA")
    print(f"{'res':>5} {'base':>5} {'ckpt':>4} | {'weights':>8} {'LoRA+opt':>8} {'activ.':>7} | "
          f"{'frozen TE':>9} {'TE kept':>7}  (GiB)")
    for res, fp8, gc in itertools.product((512, 1024), (False, True), (False, True)):
        cfg = TrainConfig(model_family="flux", resolution=res, batch_size=1, lora_rank=args.rank, lora_alpha=args.rank,
                          mixed_precision="bf16", optimizer=args.optimizer, gradient_checkpointing=gc,
                          cache_latents=True, fp8_base=fp8)
        started = time.perf_counter()
        e = estimate_memory(model, cfg, "cuda", resident=False)
        kept = cfg.replace(shuffle_caption=True)
        k = estimate_memory(model, kept, "cuda", resident=False)
        g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
        print(f"{res:>5} {'fp8' if fp8 else 'bf16':>5} {'yes' if gc else 'no':>4} | {g(e.weights):>8} "
              f"{g(e.trainable):>8} {g(e.activations + e.workspace):>7} | {g(e.peak):>9} {g(k.peak):>7}  "
              f"({time.perf_counter() - started:.1f} s)", flush=True)

    swaps = (0, 8, 16, 24, 30)
    print(f"\nsmall GPUs: peak GiB with gradient checkpointing, frozen text encoders, by blocks_to_swap")
    print(f"{'res':>5} {'base':>5} | " + " ".join(f"{n:>6}" for n in swaps))
    for res, storage in itertools.product((512, 1024), ("fp8", "nf4")):
        peaks = []
        for n in swaps:
            cfg = TrainConfig(model_family="flux", resolution=res, batch_size=1, lora_rank=args.rank,
                              lora_alpha=args.rank, mixed_precision="bf16", optimizer=args.optimizer,
                              gradient_checkpointing=True, cache_latents=True, fp8_base=storage == "fp8",
                              nf4_base=storage == "nf4", blocks_to_swap=n)
            peaks.append(estimate_memory(model, cfg, "cuda", resident=False).peak / GiB)
        print(f"{res:>5} {storage:>5} | " + " ".join(f"{v:>6.1f}" for v in peaks), flush=True)


if __name__ == "__main__":
    main()
