"""How much memory a run will need on its device, before anything is loaded or allocated.

The frozen weights and the trainable LoRA (weights, gradients, optimizer state) are counted exactly. The
activations are measured, not guessed: the run's own UNet (and text encoders when they train), with the run's
LoRA injected, does one forward pass on the meta device at the run's batch and resolution, and every tensor that
autograd keeps for the backward pass is added up (once per storage; frozen weights are not activations).
Gradient checkpointing is traced as it runs: a checkpointed block keeps its inputs, and only the largest block's
own tensors exist at once (while it is recomputed). Attention is counted as the fused kernels that torch picks on
CUDA and on the CPU keep it (q, k, v, output and the log-sum-exp; no N x N matrix). Latent caching is its own
phase (the VAE encoder without gradients). `bench/bench_memory_plan.py` measures the result against real peaks.
FLUX.1's transformer step and frozen weights are described in flux_memory.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from .kinds import kind_of

GiB = 2 ** 30

# bytes of optimizer state per trainable (fp32) parameter
OPTIMIZER_STATE = {"adamw": 8, "adamw8bit": 2, "lion": 4, "prodigy": 16, "adafactor": 4}
# The backward pass's short-lived tensors (gradients of activations, a layer's temporaries) and the allocator's
# keeping of freed blocks, as a share of what autograd keeps. CPU: measured with bench/bench_memory_plan.py (peak RSS
# rises about 2.1-2.3x the kept bytes on a full-size SD 1.5 UNet: glibc keeps freed temporaries). CUDA: the caching
# allocator reuses freed blocks; the share is the usual one for UNet training, to be measured with --gpu.
WORKSPACE_SHARE = {"cpu": 1.2, "cuda": 0.5}
WORKSPACE_DEFAULT = 0.8
# what a run holds besides tensors (threads, dataset index, peft wrappers, file buffers): measured on the CPU
RUNTIME = {"cpu": 24 * 2 ** 20}


@dataclass
class MemoryEstimate:
    device: str
    weights: int        # the frozen base model, as it trains
    resident: bool      # the weights are loaded already (the WebUI's model): not extra memory
    trainable: int      # LoRA weights + gradients + optimizer state
    activations: int    # kept for the backward pass at this batch and resolution
    workspace: int      # backward-pass temporaries
    caching: int        # latent caching (VAE encoder, no gradients): a phase before training
    gradient_checkpointing: bool
    kept_text_encoders: int = 0  # FLUX.1: CLIP + T5 bytes among `weights` (loaded for the whole run)

    @property
    def training(self) -> int:
        return self.trainable + self.activations + self.workspace

    @property
    def peak(self) -> int:
        """Whole-run peak including the weights."""
        return self.weights + max(self.training, self.caching)

    @property
    def extra(self) -> int:
        """What the run adds to what is in memory now."""
        return self.peak - (self.weights if self.resident else 0)

    def parts(self) -> str:
        w = f"model {gib(self.weights)}" + (" (loaded already)" if self.resident else "")
        if self.kept_text_encoders:
            w += f" of which text encoders {gib(self.kept_text_encoders)}"
        return (f"{w} + LoRA and optimizer {gib(self.trainable)} + activations {gib(self.activations + self.workspace)}"
                f"{'' if self.gradient_checkpointing else ' (no gradient checkpointing)'}"
                + (f"; latent caching peaks at {gib(self.caching)} before training" if self.caching > self.training
                   else ""))


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"


# --- tracing ------------------------------------------------------------------------------------------------
class _Kept:
    """Bytes autograd keeps, counted once per storage; frozen parameters are not counted."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.sizes: dict[int, int] = {}
        self.keep_alive: list[torch.Tensor] = []  # meta tensors: free, and their ids must not be reused

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude:
            self.sizes[key] = max(self.sizes.get(key, 0), storage.nbytes())
            self.keep_alive.append(t)
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def split(self, weight_copies: set[int]) -> tuple[int, int]:
        """(activations, copies of weights) among the kept bytes."""
        copies = sum(n for k, n in self.sizes.items() if k in weight_copies)
        return self.total - copies, copies

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _FusedAttention(torch.autograd.Function):
    """What torch's fused attention keeps for backward: q, k, v, the output and one float per query and head."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace is forward only
        raise NotImplementedError


def _fused_sdpa(query, key, value, *args, dtype: Optional[torch.dtype] = None, **kwargs):
    if dtype is not None:  # autocast runs attention in the low precision
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return _FusedAttention.apply(query, key, value)


class _MetaOps(torch.overrides.TorchFunctionMode):
    """What the meta device needs to run the models' forward passes as the real device would:

    - torch.autocast's casting policy for the ops that decide memory (autocast does not act on the meta device):
      matrix products and convolutions in the low precision (inputs cast, each cast a new tensor the op may keep),
      normalizations and softmax in fp32, concatenations in the widest type. Off when `dtype` is None.
    - a tensor used as a fill value (older transformers' CLIP causal mask) is read as a number, which meta tensors
      cannot give: any number does for shapes."""

    LOW = {F.linear, F.conv1d, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm}
    HIGH = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, F.log_softmax, torch.exp, torch.pow, torch.rsqrt,
            torch.norm, F.mse_loss}
    WIDEST = {torch.cat, torch.stack}

    def __init__(self, dtype: Optional[torch.dtype]):
        super().__init__()
        self.dtype = dtype
        self.weight_copies: set[int] = set()  # storages of low-precision copies of weights (kept, not temporary)
        self._alive: list[torch.Tensor] = []

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            cast = value.to(dtype)
            if isinstance(value, torch.nn.Parameter):
                self.weight_copies.add(cast.untyped_storage()._cdata)
                self._alive.append(cast)
            return cast
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value")[len(args):3])]  # newer diffusers: by name
            return _fused_sdpa(*qkv, dtype=self.dtype)
        if func is torch.full and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].is_meta:
            args = (args[0], 0.0, *args[2:])
        if self.dtype is None:
            return func(*args, **kwargs)
        if func in self.LOW:
            args, kwargs = self._cast(args, self.dtype), {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        elif func in self.HIGH:
            args = self._cast(args, torch.float32)
        elif func in self.WIDEST and args and isinstance(args[0], (list, tuple)):
            tensors = [t for t in args[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if tensors:
                widest = max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).bits)
                args = (self._cast(args[0], widest), *args[1:])
        return func(*args, **kwargs)


# the blocks diffusers' UNet and transformers' CLIP run through torch.utils.checkpoint when it is on
CHECKPOINTED_UNET = ("ResnetBlock2D", "Transformer2DModel", "DualTransformer2DModel")
CHECKPOINTED_TEXT = ("CLIPEncoderLayer",)


class _Tracer:
    """Routes what autograd keeps to the right place. With gradient checkpointing a checkpointed block keeps only
    its inputs; its own tensors are counted apart, since they exist only while that one block is recomputed in the
    backward pass. Done with hooks on the traced (meta) modules, not by patching torch: a WebUI may be generating
    in another thread meanwhile."""

    def __init__(self, exclude: set[int]):
        self.outer = _Kept(exclude)
        self.stack: list[_Kept] = []
        self.blocks: list[int] = []

    def pack(self, t: torch.Tensor):
        return (self.stack[-1] if self.stack else self.outer).pack(t)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, _Kept.unpack)

    def checkpoint(self, modules: list[torch.nn.Module], names: tuple[str, ...]) -> list:
        def enter(_module, args, kwargs):
            if not self.stack:  # a block inside a checkpointed block is part of it
                for value in (*args, *kwargs.values()):
                    if isinstance(value, torch.Tensor):
                        self.outer.pack(value)
            self.stack.append(_Kept(self.outer.exclude))

        def leave(_module, _args, _kwargs, _output):
            self.blocks.append(self.stack.pop().total)

        handles = []
        for root in modules:
            for m in root.modules():
                if type(m).__name__ in names:
                    handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
                    handles.append(m.register_forward_hook(leave, with_kwargs=True))
        return handles


def _param_storages(*modules) -> set[int]:
    return {p.untyped_storage()._cdata for m in modules for p in m.parameters()}


def _nbytes(*modules, dtype: Optional[torch.dtype] = None) -> int:
    return sum(p.numel() * (torch.empty((), dtype=dtype or p.dtype).element_size())
               for m in modules for p in m.parameters())


def _vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _trace(frozen: list, checkpointed: list[tuple[list, tuple[str, ...]]], autocast: Optional[torch.dtype],
           forward: Callable[[], None]) -> tuple[int, int]:
    """Bytes autograd keeps while `forward()` runs one training micro-batch on meta modules: (activations,
    low-precision copies of weights). Autocast casts a frozen fp32 weight anew in every forward pass and the
    backward pass needs the copy; it is kept memory, not a temporary. frozen: the modules whose parameters are
    resident (LoRA weights are counted apart); checkpointed: (modules, block class names) that gradient
    checkpointing wraps in this run."""
    tracer = _Tracer(_param_storages(*frozen))
    handles = []
    for modules, names in checkpointed:
        handles += tracer.checkpoint(modules, names)
    try:
        with contextlib.ExitStack() as stack:
            ops = stack.enter_context(_MetaOps(autocast))
            stack.enter_context(tracer.hooks())
            stack.enter_context(torch.set_grad_enabled(True))
            forward()
    finally:
        for h in handles:
            h.remove()
    activations, copies = tracer.outer.split(ops.weight_copies)
    return activations + max(tracer.blocks, default=0), copies


def _trace_training(model, cfg: TrainConfig, autocast: Optional[torch.dtype]) -> tuple[int, int]:
    """The SD UNet families' micro-batch: text encoders (with gradients when they train), then the UNet."""
    unet = model.unet
    b = cfg.batch_size
    side = cfg.resolution // _vae_scale(model.vae)
    dtype = autocast or next(unet.parameters()).dtype
    checkpointed = []
    if cfg.gradient_checkpointing:
        checkpointed.append(([unet], CHECKPOINTED_UNET))
        if cfg.train_text_encoder:
            checkpointed.append((model.text_encoders, CHECKPOINTED_TEXT))

    def forward():
        hidden, pooled = [], None
        with contextlib.nullcontext() if cfg.train_text_encoder else torch.no_grad():
            for te in model.text_encoders:
                ids = torch.zeros(b, 77, dtype=torch.long, device="meta")
                out = te(ids, output_hidden_states=True, return_dict=True)
                hidden.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
        embeds = torch.cat([h.to(dtype) for h in hidden], dim=-1)
        latents = torch.empty(b, unet.config.in_channels, side, side, dtype=dtype, device="meta")
        timesteps = torch.zeros(b, dtype=torch.long, device="meta")
        kwargs = {}
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype),
                                           "time_ids": torch.empty(b, 6, dtype=dtype, device="meta")}
        unet(latents, timesteps, encoder_hidden_states=embeds, **kwargs)

    return _trace([unet, *model.text_encoders], checkpointed, autocast, forward)


VAE_PIXELS = 4 * 512 * 512  # pixels encoded at once while caching: ~0.5 GiB per fp32 activation of the VAE's top


def vae_chunk(batch_size: int, pixels: int) -> int:
    """Images of one bucket encoded together while caching latents: several at once is faster on a GPU, but the
    VAE's full-resolution activations grow with every image (16 SDXL images at 1024 px would need ~8 GiB each)."""
    return max(1, min(max(1, batch_size) * 4, VAE_PIXELS // max(1, pixels)))


def _trace_vae_encode(vae, images: int, resolution: int, dtype: torch.dtype) -> int:
    """Peak bytes of encoding `images` pictures without gradients: the largest activation of any layer, its
    input and one temporary."""
    largest = [0]

    def hook(_module, inputs, output):
        size = sum(t.numel() * t.element_size() for t in (*inputs, output) if isinstance(t, torch.Tensor))
        largest[0] = max(largest[0], size)

    handles = [m.register_forward_hook(hook) for m in vae.encoder.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            vae.encoder(torch.empty(images, 3, resolution, resolution, dtype=dtype, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return largest[0] * 3 // 2


# --- the estimate -------------------------------------------------------------------------------------------
def estimate_memory(source, cfg: TrainConfig, device_type: str = "cuda", resident: bool = False) -> MemoryEstimate:
    """Peak memory of a run of `cfg` on `source`'s architecture (a BaseModel, a FluxModel, or a host's
    LoadedCheckpoint).

    resident: the weights are in memory already (a WebUI's loaded checkpoint), so only the rest is extra."""
    from ..models.meta import meta_model
    from ..network.base import create_network

    mp = cfg.mixed_precision
    autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
    if mp == "fp16" and device_type == "cpu":
        autocast = torch.bfloat16
    # the trainer's placement (Trainer._place_model): its own model in the training precision, a host's as it is
    model = meta_model(source) if resident else meta_model(source, dtype=autocast or torch.float32)
    if resident:
        host_dtype = next(model.unet.parameters()).dtype
        if autocast is None and host_dtype in (torch.float16, torch.bfloat16):
            autocast = host_dtype  # half-precision host weights train under autocast in their precision
    else:
        model.vae.to(torch.float32)
    kind_of(model).configure(model, cfg)  # what the run sets on its model (FLUX.1: the T5 length)
    flux = model.family == "flux"
    if flux:
        from .flux_memory import flux_weights, trace_flux_training

        weights, kept_text = flux_weights(model, cfg, resident)
    else:
        weights, kept_text = _nbytes(model.unet, *model.text_encoders, model.vae), 0

    with torch.device("meta"):  # shapes only: initialising a 12B model's LoRA on the CPU takes seconds
        network = create_network(model, cfg)
    for p in network.parameters():
        p.data = p.data.to(torch.float32)  # LoRA weights are fp32
    params = sum(p.numel() for p in network.parameters())
    trainable = params * (4 + 4 + OPTIMIZER_STATE.get(cfg.optimizer, 8))  # fp32 weights, gradients, state

    activations, weight_copies = (trace_flux_training if flux else _trace_training)(model, cfg, autocast)
    vae_images = vae_chunk(cfg.batch_size, cfg.resolution ** 2) if cfg.cache_latents else cfg.batch_size
    encode = _trace_vae_encode(model.vae, vae_images, cfg.resolution, next(model.vae.parameters()).dtype)
    caching = encode if cfg.cache_latents else 0
    if not cfg.cache_latents:
        activations += encode  # encoded every step, next to the UNet's tensors
    share = WORKSPACE_SHARE.get(device_type, WORKSPACE_DEFAULT)
    workspace = int(activations * share) + RUNTIME.get(device_type, 0)
    activations += weight_copies
    caching = int(caching * (1 + share)) if device_type == "cpu" else caching  # RSS keeps the freed temporaries too
    return MemoryEstimate(device=device_type, weights=weights, resident=resident, trainable=trainable,
                          activations=activations, workspace=workspace, caching=caching,
                          gradient_checkpointing=cfg.gradient_checkpointing, kept_text_encoders=kept_text)


# --- does it fit, and what makes it fit ------------------------------------------------------------------
def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on the device now (None when unknown)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _halve_batch(cfg: TrainConfig) -> Optional[TrainConfig]:
    if cfg.batch_size < 2:
        return None
    return cfg.replace(batch_size=cfg.batch_size // 2, gradient_accumulation_steps=cfg.gradient_accumulation_steps * 2)


def _lower_resolution(cfg: TrainConfig) -> Optional[TrainConfig]:
    lower = {1024: 768, 768: 640, 640: 512, 512: 384, 384: 256}.get(cfg.resolution)
    return cfg.replace(resolution=lower, max_bucket_reso=max(lower, min(cfg.max_bucket_reso, lower * 2)),
                       min_bucket_reso=min(cfg.min_bucket_reso, lower)) if lower else None


# (what a person reads, the config with that change or None when it does not apply); the order is the least
# loss of quality or speed first
FIXES: list[tuple[str, Callable[[TrainConfig], Optional[TrainConfig]]]] = [
    ("turn on gradient checkpointing (slower steps, same result)",
     lambda c: None if c.gradient_checkpointing else c.replace(gradient_checkpointing=True)),
    ("store the frozen transformer in fp8 (fp8_base: true; FLUX.1, about half its bf16 size)",
     lambda c: None if c.fp8_base or c.nf4_base else c.replace(fp8_base=True)),
    ("cache latents (the VAE then runs once per image, before training)",
     lambda c: None if c.cache_latents else c.replace(cache_latents=True)),
    ("use 8-bit AdamW (needs bitsandbytes)",
     lambda c: c.replace(optimizer="adamw8bit") if c.optimizer in ("adamw", "prodigy") else None),
    ("halve the batch size and double gradient accumulation (same effective batch)", _halve_batch),
    ("do not train the text encoder", lambda c: c.replace(train_text_encoder=False) if c.train_text_encoder else None),
    *[(f"keep {n} transformer blocks' weights in CPU memory (blocks_to_swap: {n}; FLUX.1: slower steps, same result)",
       lambda c, n=n: c.replace(blocks_to_swap=n) if c.blocks_to_swap < n else None) for n in (8, 16, 24, 30)],
    ("store the frozen transformer in 4-bit nf4 (nf4_base: true; FLUX.1, a quarter of its bf16 size, a little less "
     "faithful; needs bitsandbytes)", lambda c: None if c.nf4_base else c.replace(nf4_base=True, fp8_base=False)),
    ("train at a lower resolution", _lower_resolution),
]


@dataclass
class Plan:
    estimate: MemoryEstimate
    free: Optional[int]
    fix: Optional[str] = None              # the one change that makes it fit
    fixed: Optional[MemoryEstimate] = None
    fixed_config: Optional[TrainConfig] = None

    @property
    def fits(self) -> Optional[bool]:
        return None if self.free is None else self.estimate.extra <= self.free

    def describe(self) -> str:
        e = self.estimate
        head = f"Estimated peak memory on {e.device.upper()}: {gib(e.peak)} ({e.parts()})."
        if self.free is None:
            return head
        room = f"{gib(self.free)} free now"
        if self.fits:
            return f"{head} Fits: needs {gib(e.extra)} more, {room}."
        msg = f"{head} Will not fit: needs {gib(e.extra)} more, {room}."
        if self.fix:
            return f"{msg} To fit: {self.fix} (then {gib(self.fixed.extra)} more)."
        return msg + " No single change makes it fit; lower the resolution and batch size together."


def plan_memory(source, cfg: TrainConfig, device: torch.device, resident: bool,
                free: Optional[int] = None, can_8bit: Optional[bool] = None) -> Plan:
    """The estimate, whether it fits in what is free, and if not the first single change (from FIXES) that fits."""
    if free is None:
        free = free_memory(device)
    estimate = estimate_memory(source, cfg, device.type, resident)
    result = Plan(estimate, free)
    if result.fits is not False:
        return result
    if can_8bit is None:
        import importlib.util

        can_8bit = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    for words, change in FIXES:
        # FLUX.1's storage and swap fixes are for our own load: a host's model stays as the host holds it
        flux_own = getattr(source, "family", "") == "flux" and not resident
        if "bitsandbytes" in words and not can_8bit or "FLUX.1" in words and not flux_own:
            continue
        changed = change(cfg)
        if changed is None:
            continue
        fixed = estimate_memory(source, changed, device.type, resident)
        if fixed.extra <= free:
            return replace(result, fix=words, fixed=fixed, fixed_config=changed)
    return result


def memory_note(model, cfg: TrainConfig, device: torch.device) -> Optional[str]:
    """The plan as one log line for a run that has its model loaded; None when it cannot be made (advice only)."""
    try:
        return plan_memory(model, cfg, device, resident=True).describe()
    except Exception:
        return None
