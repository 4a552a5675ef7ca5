"""FluxModel: the frozen FLUX.1 modules a LoRA is trained against, and prompt encoding as FluxPipeline does it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..base import BaseModel
from ..low_precision import float_dtype

FAMILY = "flux"
# T5 tokens per prompt that BFL's pipelines use by default (diffusers' FluxPipeline: 512; schnell: 256)
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
# ss_base_model_version / modelspec values kohya writes for FLUX.1 LoRAs; Forge's LoRA list marks a card "Flux"
# by this architecture or implementation
BASE_MODEL_VERSION = {"dev": "flux1", "schnell": "flux1"}
MODELSPEC_ARCH = {"dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora"}
MODELSPEC_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


@dataclass
class FluxModel:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list   # [CLIPTextModel (pooled), T5EncoderModel (sequence)]
    tokenizers: list
    noise_scheduler: object  # FlowMatchEulerDiscreteScheduler (its shift settings are used for sampling)
    name: str = "flux"
    path: Optional[str] = None
    source: str = "diffusers"
    t5_max_length: Optional[int] = None  # None: T5_MAX_LENGTH of the variant
    family: str = FAMILY
    model_hash: Optional[str] = None
    # what the transformer computes in when its weights are stored lower (fp8, nf4); None: its weights' dtype
    compute_dtype: Optional[torch.dtype] = None
    base_storage: str = ""  # how the frozen transformer is stored when not as computed: float8_e4m3fn, nf4, ...

    @property
    def variant(self) -> str:
        """dev has a guidance embedder (distilled guidance is an input); schnell has none."""
        return "dev" if self.transformer.config.guidance_embeds else "schnell"

    @property
    def t5_length(self) -> int:
        return self.t5_max_length or T5_MAX_LENGTH[self.variant]

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the network code uses for the `lora_unet_` component."""
        return self.transformer

    @property
    def te_prefixes(self) -> list[str]:
        return ["lora_te1"]  # kohya: CLIP-L is lora_te1; T5 is not trained

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION[self.variant]

    @property
    def modelspec_architecture(self) -> str:
        return MODELSPEC_ARCH[self.variant]

    @property
    def modelspec_implementation(self) -> str:
        return MODELSPEC_IMPLEMENTATION

    @property
    def v_prediction(self) -> bool:
        return False

    @property
    def modelspec_prediction_type(self) -> str:
        return "flow"  # rectified flow: the transformer predicts the velocity noise - image

    def extra_metadata(self, cfg) -> dict:
        """The FLUX.1 settings a LoRA file records besides the common ss_* keys (kohya's names)."""
        return {"ss_t5xxl_max_token_length": self.t5_length, "ss_guidance_scale": cfg.guidance_scale,
                "ss_timestep_sampling": cfg.timestep_sampling, "ss_sigmoid_scale": cfg.sigmoid_scale,
                "ss_discrete_flow_shift": cfg.discrete_flow_shift}

    def describe(self) -> str:
        return f"FLUX.1 {self.variant} from {self.source} {self.path or self.name}"

    # the same as an SD bundle's, through the `unet` alias
    to = BaseModel.to
    freeze = BaseModel.freeze


def encode_flux_prompts(model: FluxModel, texts: list[str], max_length: Optional[int] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence embeds [B, L, D], CLIP pooled [B, P]) as FluxPipeline.encode_prompt computes them:
    CLIP padded to 77 tokens, its pooled output; T5 padded to max_length, its last hidden state."""
    clip, t5 = model.text_encoders
    clip_tok, t5_tok = model.tokenizers
    ids = clip_tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
    length = max_length or model.t5_length
    ids = t5_tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    seq = t5(ids.to(t5.device), output_hidden_states=False)[0]
    dtype = model.compute_dtype or float_dtype(model.transformer)
    return seq.to(dtype), pooled.to(dtype)
