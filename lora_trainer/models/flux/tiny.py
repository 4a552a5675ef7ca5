"""Tiny FLUX.1 models with random weights, built in code (no hub access).

Real architecture (FluxTransformer2DModel with double and single blocks, CLIP-L + T5 encoders, a 16-channel VAE
with Flux's shift and scaling factors) at toy sizes. Written the ways people have Flux: a diffusers folder
that `FluxPipeline.from_pretrained` loads, or BFL's single transformer file beside a folder with the rest.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

# Flux's VAE latent normalisation (ae.safetensors): latents = (z - shift) * scale
VAE_SHIFT, VAE_SCALE = 0.1159, 0.3611
TINY_HEADS, TINY_HEAD_DIM = 2, 32
TEXT_DIM = 32  # T5 width = joint_attention_dim; CLIP width = pooled_projection_dim


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (time, height, width) for a head width: Flux's (16, 56, 56) at 128, scaled alike below."""
    return head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16


def tiny_transformer(seed: int = 0, guidance: bool = True, num_double: int = 1, num_single: int = 1,
                     heads: int = TINY_HEADS, head_dim: int = TINY_HEAD_DIM, text_dim: int = TEXT_DIM,
                     pooled_dim: int = TEXT_DIM):
    """heads=24, head_dim=128 gives Flux's real block width (what diffusers' kohya-file reader assumes)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=num_double, num_single_layers=num_single,
                                  attention_head_dim=head_dim, num_attention_heads=heads,
                                  joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
                                  guidance_embeds=guidance, axes_dims_rope=rope_axes(head_dim))


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # four levels: 8x downsampling as Flux's VAE; no quant convs, as Flux's VAE
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                         scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT, use_quant_conv=False,
                         use_post_quant_conv=False)


def t5_tokenizer():
    """A T5TokenizerFast with a character-level unigram vocabulary (ids: 0 pad, 1 </s>, 2 unk), like T5's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def tiny_t5(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM, num_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_encoder_decoder=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def tiny_flux_components(seed: int = 0, guidance: bool = True, **transformer_kwargs) -> dict:
    """The seven FluxPipeline components of a tiny random model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..tiny import _text_encoder
    from ..tokenizer import clip_tokenizer

    t5_tok = t5_tokenizer()
    return {"transformer": tiny_transformer(seed, guidance, **transformer_kwargs), "vae": tiny_vae(seed + 1),
            "text_encoder": _text_encoder(False, False, seed + 2), "tokenizer": clip_tokenizer(),
            "text_encoder_2": tiny_t5(len(t5_tok), seed + 3), "tokenizer_2": t5_tok,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                         max_shift=1.15, base_image_seq_len=256,
                                                         max_image_seq_len=4096)}


def transformer_inputs(transformer, seed: int = 0, side: int = 4, text_tokens: int = 7) -> dict:
    """Random inputs for one forward pass of a FluxTransformer2DModel: a side x side grid of packed latent
    tokens with their (0, row, column) ids, a text sequence with zero ids, a timestep and, for dev, guidance."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    n = side * side
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // side, torch.arange(n) % side], dim=1).float()
    kw = {"hidden_states": torch.randn(1, n, cfg.in_channels, generator=g),
          "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
          "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
          "timestep": torch.tensor([0.4]), "img_ids": img_ids, "txt_ids": torch.zeros(text_tokens, 3),
          "return_dict": False}
    if cfg.guidance_embeds:
        kw["guidance"] = torch.tensor([3.5])
    return kw


def write_tiny_flux_folder(folder: Path, seed: int = 0, guidance: bool = True, **transformer_kwargs) -> Path:
    """A diffusers folder (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/, scheduler/)."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    FluxPipeline(**tiny_flux_components(seed, guidance, **transformer_kwargs)).save_pretrained(str(folder))
    return folder


def write_bfl_transformer(transformer, path: Path, prefix: str = "") -> Path:
    """The transformer as one .safetensors in Black Forest Labs' layout (flux1-dev.safetensors' keys);
    prefix="model.diffusion_model." writes it the way full ComfyUI checkpoints do."""
    from safetensors.torch import save_file

    from ..tiny import _usual_mode
    from .bfl_names import diffusers_to_bfl

    cfg = transformer.config
    sd = diffusers_to_bfl(transformer.state_dict(), cfg.num_layers, cfg.num_single_layers, cfg.guidance_embeds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    _usual_mode(path)
    return path
