"""FLUX.1 at its real size with no weights: every module on the meta device, for the memory planner's numbers on
a 12B model that no test machine could load (tests, bench/bench_flux_memory.py).

The shapes are those of the published FLUX.1-dev / schnell files: a 3072-wide transformer (24 heads of 128) with
19 double and 38 single blocks, T5-XXL's encoder (4096 wide, 24 layers) and CLIP-L's text model, and the
16-channel VAE.
"""
from __future__ import annotations

import torch

from .model import FluxModel


def full_size_flux(variant: str = "dev", dtype: torch.dtype = torch.bfloat16) -> FluxModel:
    """FLUX.1 `variant` (dev: with the guidance embedder; schnell: without) on the meta device, the transformer
    and text encoders in `dtype`, the VAE in fp32 (as the trainer holds them)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                             attention_head_dim=128, num_attention_heads=24,
                                             joint_attention_dim=4096, pooled_projection_dim=768,
                                             guidance_embeds=variant == "dev", axes_dims_rope=(16, 56, 56))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                                            max_position_embeddings=77, hidden_act="quick_gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False)
    for m in (transformer, clip, t5):
        m.to(dtype)
    model = FluxModel(transformer=transformer, vae=vae, text_encoders=[clip, t5], tokenizers=[None, None],
                      noise_scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), name=f"FLUX.1-{variant}")
    model.freeze()
    return model
