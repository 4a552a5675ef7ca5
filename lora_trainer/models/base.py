"""BaseModel: the frozen Stable Diffusion modules a LoRA is trained against, and prompt encoding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .ldm_names import clip_final_layer_norm

FAMILIES = ("sd1", "sd2", "sdxl")
# The ss_base_model_version / modelspec values the hosts read (kohya-format.md).
BASE_MODEL_VERSION = {("sd1", False): "sd_v1", ("sd2", False): "sd_v2", ("sd2", True): "sd_v2_v",
                      ("sdxl", False): "sdxl_base_v1-0", ("sdxl", True): "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sdxl": "stable-diffusion-xl-v1-base/lora"}
TE_PREFIXES = {"sd1": ["lora_te"], "sd2": ["lora_te"], "sdxl": ["lora_te1", "lora_te2"]}


@dataclass
class BaseModel:
    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: object  # diffusers DDPMScheduler with the model's prediction type
    v_prediction: bool = False
    name: str = "model"
    path: Optional[str] = None
    source: str = "single-file"  # single-file | diffusers | hub | state-dict
    _hash: Optional[str] = field(default=None, repr=False)
    hash_fn: Optional[object] = field(default=None, repr=False)

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_prediction else "epsilon"

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSION[(self.family, self.v_prediction)]

    @property
    def te_prefixes(self) -> list[str]:
        return TE_PREFIXES[self.family]

    @property
    def model_hash(self) -> Optional[str]:
        """SHA-256 of the checkpoint file, computed on first use (it reads the whole file)."""
        if self._hash is None and self.hash_fn is not None:
            self._hash = self.hash_fn()
        return self._hash

    def describe(self) -> str:
        pred = "v-prediction" if self.v_prediction else "epsilon-prediction"
        return f"{self.family.upper()} ({pred}) from {self.source} {self.path or self.name}"

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "BaseModel":
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(device=device, dtype=dtype) if dtype is not None else m.to(device)
        return self

    def freeze(self) -> None:
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.requires_grad_(False)
            m.eval()


def _chunk_ids(tokenizer, texts: list[str], max_token_length: int, pad_id: int) -> tuple[torch.Tensor, int]:
    """Token ids in 75-token chunks, each wrapped in BOS ... EOS and padded to 77, like the WebUIs do.

    Returns ids of shape [batch, chunks, 77]; the chunk count is the same for the whole batch.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    per_text = [tokenizer(t, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] for t in texts]
    longest = max((len(ids) for ids in per_text), default=0)
    chunks = max(1, min((longest + 74) // 75, max_token_length // 75))
    truncated = sum(1 for ids in per_text if len(ids) > chunks * 75)
    rows = []
    for ids in per_text:
        ids = ids[:chunks * 75]
        row = []
        for c in range(chunks):
            part = ids[c * 75:(c + 1) * 75]
            if c > 0 and not part:
                part = []
            seq = [bos] + part + [eos]
            seq += [pad_id] * (77 - len(seq))
            row.append(seq)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long), truncated


def encode_prompts(model: BaseModel, texts: list[str], clip_skip: int = 1, max_token_length: int = 225
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """Text conditioning as the family's pipelines compute it.

    SD1/SD2: hidden state of the clip_skip-th last layer with the final layer norm (SD2's encoder
    is built without its unused last layer, as diffusers does). SDXL: the penultimate hidden state
    of both encoders concatenated, pooled output from the second. Long prompts are encoded in
    75-token chunks and concatenated along the sequence. Returns (embeds, pooled, truncated_count).
    """
    embeds_per_encoder = []
    pooled = None
    truncated_total = 0
    for idx, (te, tok) in enumerate(zip(model.text_encoders, model.tokenizers)):
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, truncated = _chunk_ids(tok, texts, max_token_length, pad_id)
        truncated_total = max(truncated_total, truncated)
        b, n, length = ids.shape
        device = next(te.parameters()).device
        flat = ids.view(b * n, length).to(device)
        out = te(flat, output_hidden_states=True, return_dict=True)
        if model.family == "sdxl":
            hidden = out.hidden_states[-(clip_skip + 1)]
            if idx == 1:
                pooled = out.text_embeds.view(b, n, -1)[:, 0]
        else:
            hidden = out.hidden_states[-clip_skip]
            hidden = clip_final_layer_norm(te)(hidden)
        embeds_per_encoder.append(hidden.view(b, n * length, -1))
    # A host may keep its text encoders in another precision than its UNet (Forge: fp16 encoders, an fp32
    # UNet on the CPU): hand the UNet its own dtype.
    unet_dtype = next(model.unet.parameters()).dtype
    embeds = torch.cat([e.to(unet_dtype) for e in embeds_per_encoder], dim=-1)
    return embeds, None if pooled is None else pooled.to(unet_dtype), truncated_total


def align_text_encoder_dtypes(model: BaseModel) -> int:
    """Lets text encoders that mix precisions run without copying their weights.

    Forge turns its encoders' token and position embeddings into fp32 at every prompt it encodes while the
    rest stays fp16, and patches weights in and out for its own LoRAs; its layers cast on the fly,
    transformers' do not. In an encoder with more than one weight dtype (or another one than the UNet's),
    every layer with a weight gets a forward pre-hook that casts a floating-point input to that weight's
    dtype, and the embeddings' output is cast to the dtype of the encoder's first linear layer. Returns how
    many encoders needed it."""
    fixed = 0
    unet_dtype = next(model.unet.parameters()).dtype
    for te in model.text_encoders:
        # Also when the encoder's one dtype is not the UNet's: in a real Forge (fp16 encoders, fp32 UNet on the
        # CPU) an fp32 tensor still reached a fp16 layer norm inside the encoder.
        if {p.dtype for p in te.parameters()} == {unet_dtype} or getattr(te, "_lt_dtype_hooks", None):
            continue
        hooks = []
        for module in te.modules():
            weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
            if weight is None or isinstance(module, torch.nn.Embedding):
                continue
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, t=weight.dtype: tuple(a.to(t) if torch.is_tensor(a) and a.is_floating_point()
                                                      else a for a in args)))
        embeddings = next((m for m in te.modules() if hasattr(m, "position_embedding") and hasattr(m, "token_embedding")),
                          None)
        layer = next((m for m in te.modules() if isinstance(m, torch.nn.Linear)), None)
        if embeddings is not None and layer is not None:
            hooks.append(embeddings.register_forward_hook(lambda _m, _i, out, t=layer.weight.dtype: out.to(t)))
        te._lt_dtype_hooks = hooks
        fixed += 1
    return fixed


def sdxl_time_ids(original_size, crop_top_left, target_size, device, dtype) -> torch.Tensor:
    """SDXL's size and crop conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.tensor([list(original_size) + list(crop_top_left) + list(target_size)], device=device,
                        dtype=dtype)
