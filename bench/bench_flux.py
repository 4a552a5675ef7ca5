"""FLUX.1 LoRA training speed and memory: our Trainer vs a plain diffusers + peft Flux loop on the same model.

    python bench/bench_flux.py             # tiny Flux at 64 px, then a full-width 2-block transformer at 256 px (CPU)
    python bench/bench_flux.py --quick     # the tiny Flux only (a minute)
    python bench/bench_flux.py --gpu       # also flux-wide at 512 and 1024 px in bf16 on CUDA
    python bench/bench_flux.py --variant flux-wide:512:1:bf16:cpu   # any MODEL:RES:BATCH:PRECISION:DEVICE as well
    python bench/bench_flux.py --gpu --base fp8 --blocks 2:4 --swap 2   # fp8, 1 double + 2 single blocks streamed

Models are built in code with random weights (nothing is downloaded):
  tiny-flux  lora_trainer.models.flux.tiny: 1 double + 1 single block, 2 heads x 32, text width 32.
  flux-wide  FLUX.1-dev's block width at reduced depth: 1 double + 1 single block, 24 heads x 128 (3072),
             joint_attention_dim 4096 (T5-XXL's width), pooled 768 (CLIP-L's), guidance embedder; the tiny
             16-channel VAE (latents are cached) and 1-layer text encoders of those widths (frozen, encoded once).
Both encode captions to --t5-tokens T5 tokens (default 512, as FLUX.1-dev is trained; fewer make a CPU step
shorter). Eight square images at the resolution are generated in a temporary folder.

The harness is bench_train.py's (each measurement in its own subprocess, --threads, OMP_WAIT_POLICY=PASSIVE,
timing from the end of the warm-up, --repeat, peak RSS through VmHWM):
  ours       lora_trainer.train.Trainer(cfg, events, model=FluxModel).run(): FluxKind's flow objective
             (timestep_sampling sigmoid, guidance 1.0), cache_latents, frozen text encoders, rank 16 (alpha 16)
             on the transformer modules of network/flux_targets.py, AdamW, max_grad_norm 1.0, nothing saved
             but the final LoRA.
  reference  transformer.add_adapter(LoraConfig) on the same modules (their diffusers paths), latents from the
             VAE ((z - shift) * scale) and FluxPipeline.encode_prompt embeddings made once, then per step:
             logit-normal sigma, x = (1 - sigma) x0 + sigma noise, the packed tokens through the transformer
             (timestep sigma, guidance 1.0), MSE against noise - x0, backward, clip_grad_norm_(1.0), AdamW step.
Printed: seconds per step of each, their ratio (> 1: ours is faster; also from median step times and CPU
seconds), and each process's peak RSS (in brackets its rise above the built model).

Full-size FLUX.1 (19 double + 38 single blocks, 12B parameters) does not fit a CPU run and is not built here;
--gpu measures flux-wide in bf16 (frozen weights bf16, LoRA fp32, autocast, as diffusers' scripts) at 512 and
1024 px on CUDA, i.e. the per-block cost at Flux's real width and resolutions, which a full-depth run repeats
57 times (peak memory there is torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (the shared harness)
from bench_train import SEED, Variant, add_reference_lora, reference_dtype, reference_loop, vae_latents  # noqa: E402

T5_TOKENS_ENV = "BENCH_FLUX_T5_TOKENS"
BLOCKS_ENV = "BENCH_FLUX_BLOCKS"  # "<double>:<single>" blocks of flux-wide
STORAGE_ENV = "BENCH_FLUX_STORAGE"  # "<fp8|nf4|as-built>:<blocks_to_swap>": the frozen transformer of both loops


def build_model(name: str):
    """Our FluxModel with random weights; the same seed gives the same weights in every process."""
    import torch

    from lora_trainer.models.flux.model import FluxModel
    from lora_trainer.models.flux.tiny import tiny_flux_components

    if name == "tiny-flux":
        parts = tiny_flux_components(SEED)
    elif name == "flux-wide":
        from transformers import T5Config, T5EncoderModel

        double, _, single = os.environ.get(BLOCKS_ENV, "1:1").partition(":")
        parts = tiny_flux_components(SEED, num_double=int(double), num_single=int(single), heads=24, head_dim=128,
                                     text_dim=4096, pooled_dim=768)
        parts["text_encoder"] = bench_train._clip(768, False, False, SEED + 2, layers=1)  # pooled: CLIP-L's width
        torch.manual_seed(SEED + 3)
        parts["text_encoder_2"] = T5EncoderModel(T5Config(  # sequence: T5-XXL's width, one narrow layer
            vocab_size=len(parts["tokenizer_2"]), d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2,
            feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_encoder_decoder=False, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0))
    else:
        raise SystemExit(f"unknown model {name!r}: tiny-flux or flux-wide")
    model = FluxModel(transformer=parts["transformer"], vae=parts["vae"],
                      text_encoders=[parts["text_encoder"], parts["text_encoder_2"]],
                      tokenizers=[parts["tokenizer"], parts["tokenizer_2"]], noise_scheduler=parts["scheduler"],
                      name=f"random-{name}", source="state-dict",
                      t5_max_length=int(os.environ.get(T5_TOKENS_ENV, "512")))
    model.freeze()
    storage, _, swap = os.environ.get(STORAGE_ENV, "as-built:0").partition(":")
    if storage != "as-built" or int(swap):
        # the trainer's own storage step (fp8_base / nf4_base / blocks_to_swap), applied to the model both loops
        # train on: the ratio is then the loops' on that base, and the runs against --base as-built the cost of it
        from lora_trainer.config import from_dict
        from lora_trainer.train.flux_kind import store_frozen_transformer

        cfg = from_dict({"fp8_base": storage == "fp8", "nf4_base": storage == "nf4", "blocks_to_swap": int(swap)})
        device = torch.device("cuda") if torch.cuda.is_available() else None
        store_frozen_transformer(model, cfg, torch.float32, device, lambda msg: print(msg, file=sys.stderr))
    return model


def reference_targets(transformer) -> list[str]:
    """The diffusers module paths our network adapts (network/flux_targets.py), as peft target_modules."""
    from lora_trainer.network.flux_targets import flux_transformer_targets

    return [t.module for t in flux_transformer_targets(transformer)]


def run_reference(v: Variant, model, data: Path, meter) -> dict:
    """A plain diffusers + peft Flux LoRA loop (no accelerate, no prior preservation, no text-encoder training)."""
    import torch
    import torch.nn.functional as F
    from diffusers import FluxPipeline

    device = torch.device(v.device)
    weight_dtype = reference_dtype(v)
    transformer, vae = model.transformer, model.vae
    meter.start()
    t0 = time.perf_counter()
    for m in (transformer, vae, *model.text_encoders):
        m.requires_grad_(False)

    # Precompute: latents with the VAE, prompt embeddings as FluxPipeline makes them.
    z, captions = vae_latents(vae, data, device)
    latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
    pipe = FluxPipeline(scheduler=model.noise_scheduler, vae=vae, text_encoder=model.text_encoders[0],
                        tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                        tokenizer_2=model.tokenizers[1], transformer=transformer)
    for te in model.text_encoders:
        te.to(device)
    with torch.no_grad():
        prompt_embeds, pooled_embeds, txt_ids = pipe.encode_prompt(captions, captions, device=device,
                                                                   max_sequence_length=model.t5_max_length)
    vae.to("cpu")
    for te in model.text_encoders:
        te.to("cpu")

    params, optimizer, scaler, n_layers = add_reference_lora(transformer, reference_targets(transformer), device,
                                                             weight_dtype)
    autocast = weight_dtype != torch.float32
    b, c, h, w = v.batch, *latents.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, weight_dtype)
    guidance = torch.full((b,), 1.0, device=device) if transformer.config.guidance_embeds else None
    gen = torch.Generator("cpu").manual_seed(SEED)

    def batch_loss():
        idx = torch.randint(0, len(latents), (b,), generator=gen).to(device)
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(b, device=device))  # logit-normal
        s = sigma.view(b, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - s) * x0 + s * noise, b, c, h, w)
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)  # the velocity, in the same token order
        with torch.autocast(device.type, dtype=weight_dtype, enabled=autocast):
            pred = transformer(hidden_states=noisy, timestep=sigma, guidance=guidance,
                               pooled_projections=pooled_embeds[idx], encoder_hidden_states=prompt_embeds[idx],
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    return reference_loop(v, batch_loss, params, optimizer, scaler, meter, t0, n_layers)


def variants(args) -> list[Variant]:
    out = [Variant("tiny-flux", 64, 2, "no", "cpu", args.warmup or 5, args.steps or 40)]
    if not args.quick:
        out.append(Variant("flux-wide", args.resolution, args.batch, "no", "cpu", args.warmup or 1, args.steps or 3))
    out += bench_train.gpu_variants(args, [("flux-wide", 512, "bf16"), ("flux-wide", 1024, "bf16")])
    out += [bench_train.parse_variant(spec, args.warmup or 2, args.steps or 10) for spec in args.variant or []]
    return out


def main() -> None:
    parser = bench_train.run_parser(__doc__, "the tiny Flux only", "also flux-wide at 512 and 1024 px in bf16 on CUDA",
                                    "flux-wide CPU", "40 tiny, 3 flux-wide, 20 GPU", "5 tiny, 1 flux-wide, 3 GPU",
                                    "tiny-flux:128:1:bf16:cpu or flux-wide:1024:1:bf16:cuda")
    parser.add_argument("--t5-tokens", type=int, default=512, help="T5 sequence length of the captions (as dev's)")
    parser.add_argument("--base", default="as-built", choices=["as-built", "fp8", "nf4"],
                        help="store the frozen transformer in fp8 / nf4 (fp8_base / nf4_base) in both loops")
    parser.add_argument("--swap", type=int, default=0,
                        help="blocks_to_swap in both loops (kohya's count: N // 2 double, (N - N // 2) * 2 single "
                             "blocks; e.g. --swap 2 --blocks 2:4)")
    parser.add_argument("--blocks", default="1:1", help="flux-wide's double:single blocks (default 1:1)")
    args = parser.parse_args()

    if args._worker:
        bench_train.worker(json.loads(args._worker), args._impl, args._result, args.threads, build=build_model,
                           reference=run_reference)
        return
    os.environ[T5_TOKENS_ENV] = str(args.t5_tokens)  # the workers' caption length
    os.environ[STORAGE_ENV] = f"{args.base}:{args.swap}"
    os.environ[BLOCKS_ENV] = args.blocks
    if args.base != "as-built" or args.swap:
        print(f"frozen transformer: {args.base}, blocks_to_swap {args.swap} (both loops)")
    print(f"T5 tokens per caption: {args.t5_tokens}")
    bench_train.compare(variants(args), args, script=Path(__file__), per_step=True)


if __name__ == "__main__":
    main()
