"""Frozen Linear layers whose weight is stored in low precision (fp8, or bitsandbytes' packed nf4) and computed in
the activation's precision: the base a LoRA is trained on top of, at a fraction of the memory.

`FrozenLowPrecisionLinear` is a `torch.nn.Linear` subclass so that peft wraps it like any Linear. Its weight is
never trained: each call materialises it in the compute dtype (upcast, or dequantized) just for that call, so
only one layer's float weight exists at a time; the input keeps its gradient (LoRA layers upstream train).

Fused weights (FLUX.1's qkv, a single block's linear1) train as separate modules. fp8 and float rows are views of
the fused tensor; packed nf4 data cannot be cut per row group, so an nf4 part holds the whole fused weight and
takes its `rows` after dequantizing. That costs one dequantization per part (3-4 per fused layer) but keeps the
LoRA layout (one LoRA per diffusers module) the same as on a float base, so the files are the same too.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_4bit(tensor) -> bool:
    """bitsandbytes' packed 4-bit weight (Params4bit, Forge's ForgeParams4bit): uint8 data plus a quant_state."""
    return getattr(tensor, "quant_state", None) is not None


def dequantize_nf4(weight) -> torch.Tensor:
    """The float weight of a bitsandbytes 4-bit Params4bit, on the weight's device (bitsandbytes >= 0.46
    dequantizes on the CPU too; older releases on CUDA only)."""
    try:
        from bitsandbytes.functional import dequantize_4bit
    except ImportError as exc:
        raise RuntimeError("nf4 weights need bitsandbytes: pip install bitsandbytes") from exc
    try:
        return dequantize_4bit(weight, quant_state=weight.quant_state)
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        if weight.device.type == "cuda":
            raise
        raise RuntimeError(f"this bitsandbytes cannot dequantize nf4 weights on {weight.device} ({exc}); train on a "
                           f"CUDA GPU, upgrade bitsandbytes (>= 0.46 runs on the CPU), or use fp8 / bf16") from exc


NF4_BLOCK = 64  # weights per absmax; with double quantization the absmax are 8-bit: ~0.52 bytes a weight in all


def quantize_nf4(weight: torch.Tensor, device: Optional[torch.device] = None):
    """`weight` packed as bitsandbytes nf4 with double quantization (QLoRA's storage), quantized on `device` (the
    GPU is ~100x faster than the CPU at it) and returned where `weight` is, as a frozen Params4bit."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit
    except ImportError as exc:
        raise RuntimeError("nf4_base needs bitsandbytes: pip install bitsandbytes") from exc
    work = weight.detach().to(device if device is not None else weight.device).contiguous()
    packed, state = quantize_4bit(work, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
    param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                              compress_statistics=True, quant_type="nf4", bnb_quantized=True)
    return param.to(weight.device)  # moves the quant_state with it


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is on, else the input's."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except TypeError:  # torch < 2.4 has no device argument
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


class _RecastLinear(torch.autograd.Function):
    """x W^T + b whose backward materialises W again instead of keeping it: autograd would otherwise hold every
    layer's upcast weight from forward to backward, a full-precision copy of the model (as bitsandbytes' 4-bit
    matmul does, the low-precision weight is re-read in backward)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        w, b = layer.materialize(x.dtype, x.device)
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        w, _ = ctx.layer.materialize(grad.dtype, grad.device)
        return grad @ w, None


class FrozenLowPrecisionLinear(torch.nn.Linear):
    """y = x W^T + b with W stored as given (fp8, packed nf4, or a float tensor) and cast per call.

    weight, bias: the stored tensors (shared, never copied); rows: output-row ranges of the (dequantized) stored
    weight and of the bias that this layer computes, in order (None: all); scale: a scalar the stored weight is multiplied by (scaled fp8);
    dequantize: stored -> float weight (None: a plain cast). `compute_dtype = None` tells peft (>= 0.15) to leave
    the LoRA weights in their own precision.

    offloaded (offload()): the stored weight stays in CPU memory when the module moves, and each call copies it to
    the input's device first (block swap: frozen weights streamed in layer by layer, in forward and backward)."""

    compute_dtype = None
    offloaded = False

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], in_features: int, out_features: int,
                 rows: Optional[tuple[tuple[int, int], ...]] = None, scale: Optional[torch.Tensor] = None,
                 dequantize: Optional[Callable] = None):
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        self.weight.requires_grad_(False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.scale = None if scale is None else torch.nn.Parameter(scale, requires_grad=False)
        self.rows = rows
        self.dequantize = dequantize

    def _cut(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's rows of `t` in `dtype`: one range is cut first (a view, so only those rows are cast);
        reordered ranges are cast first (autocast's cat refuses fp8)."""
        if self.rows is None:
            return t.to(dtype)
        if len(self.rows) == 1:
            return t[self.rows[0][0]:self.rows[0][1]].to(dtype)
        t = t.to(dtype)
        return torch.cat([t[a:b] for a, b in self.rows])

    def _stored(self, device: Optional[torch.device]) -> torch.Tensor:
        """The stored weight on `device`: itself, or (offloaded) a copy for this call. Params4bit.to moves the
        (small) quant_state for good and the packed data for this call."""
        w = self.weight
        if device is None or w.device == device:
            return w
        return w.to(device, non_blocking=True)

    def materialize(self, dtype: torch.dtype, device: Optional[torch.device] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        stored = self._stored(device)
        w = self._cut(stored if self.dequantize is None else self.dequantize(stored), dtype)
        if self.scale is not None:
            w = w * self.scale.to(w.device, dtype)
        return w, None if self.bias is None else self._cut(self.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        x = x.to(dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _RecastLinear.apply(x, self)
        w, b = self.materialize(dtype, x.device)
        return torch.nn.functional.linear(x, w, b)

    def offload(self) -> int:
        """Keeps the stored weight in CPU memory from now on (pinned when there is a GPU: faster copies, and
        copies that need not wait); returns its bytes."""
        for tensor in (self.weight, self.scale):
            if tensor is not None:
                data = tensor.data.to("cpu")
                tensor.data = data.pin_memory() if torch.cuda.is_available() and not data.is_pinned() else data
        self.offloaded = True
        return self.weight.nbytes

    def _apply(self, fn, recurse=True):
        """Moves keep the stored weight's dtype: `module.to(device, dtype)` must not turn fp8 back into bf16
        (a copy of the whole model) nor touch packed nf4 data other than moving it."""
        target = fn(torch.empty(0, device=self.weight.device))
        stored = {} if self.offloaded else {"weight": self.weight, "scale": self.scale}
        for name, tensor in stored.items():
            if tensor is not None and tensor.device != target.device:
                moved = tensor.to(target.device)
                setattr(self, name, moved if isinstance(moved, torch.nn.Parameter)
                        else torch.nn.Parameter(moved, requires_grad=False))
        if self.bias is not None:
            self.bias = torch.nn.Parameter(fn(self.bias), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        kind = "nf4" if is_4bit(self.weight) else str(self.weight.dtype).replace("torch.", "")
        return (f"{super().extra_repr()}, stored={kind}" + (f", rows={self.rows}" if self.rows else "")
                + (", offloaded" if self.offloaded else ""))


def fp8_linear(linear: torch.nn.Linear, dtype: torch.dtype = torch.float8_e4m3fn) -> FrozenLowPrecisionLinear:
    """A frozen copy of `linear` with its weight in fp8 (the bias stays in its precision: it is small)."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an fp8 dtype ({', '.join(str(d) for d in FP8_DTYPES)})")
    weight = linear.weight.detach().to(dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    return FrozenLowPrecisionLinear(weight, bias, linear.in_features, linear.out_features)


def nf4_linear(linear: torch.nn.Linear, device: Optional[torch.device] = None) -> FrozenLowPrecisionLinear:
    """A frozen copy of `linear` with its weight packed in nf4 (quantized on `device`); the bias keeps its precision."""
    bias = None if linear.bias is None else linear.bias.detach()
    return FrozenLowPrecisionLinear(quantize_nf4(linear.weight, device), bias, linear.in_features,
                                    linear.out_features, dequantize=dequantize_nf4)


def frozen_linear(linear: torch.nn.Linear) -> FrozenLowPrecisionLinear:
    """`linear` as a frozen layer on the same tensors (no copy): one that can be offloaded."""
    if isinstance(linear, FrozenLowPrecisionLinear):
        return linear
    bias = None if linear.bias is None else linear.bias.detach()
    return FrozenLowPrecisionLinear(linear.weight.detach(), bias, linear.in_features, linear.out_features)


def set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def replace_linears(model: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> int:
    """Replaces every plain nn.Linear of `model` by make(linear), layer by layer (the peak is one layer's extra
    copy); returns how many. Other parameters (norms, embeddings) keep their precision."""
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    with torch.no_grad():
        for name in names:
            set_module(model, name, make(model.get_submodule(name)))
    return len(names)


def to_fp8(model: torch.nn.Module, dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """Every nn.Linear of `model` stored in fp8 (frozen); returns how many."""
    return replace_linears(model, lambda linear: fp8_linear(linear, dtype))


def to_nf4(model: torch.nn.Module, device: Optional[torch.device] = None) -> int:
    """Every nn.Linear of `model` stored in nf4 (frozen, quantized on `device`); returns how many."""
    return replace_linears(model, lambda linear: nf4_linear(linear, device))


def offload_linears(module: torch.nn.Module) -> int:
    """Every Linear of `module` kept in CPU memory and streamed to the compute device per call (frozen layers on
    the same tensors, fp8 / nf4 kept as they are); returns the bytes that leave the device."""
    replace_linears(module, frozen_linear)
    return sum(layer.offload() for layer in low_precision_layers(module))


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The precision `model` computes in: that of its first float parameter not stored in fp8 / 4-bit."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype not in FP8_DTYPES and not is_4bit(p):
            return p.dtype
    return torch.float32


def low_precision_layers(model: torch.nn.Module) -> list[FrozenLowPrecisionLinear]:
    return [m for m in model.modules() if isinstance(m, FrozenLowPrecisionLinear)]


def keep_adapters_fp32(layers) -> int:
    """peft < 0.15 casts a new LoRA to its base weight's dtype (fp8 here), which rounds its initial weights to
    3 mantissa bits: on a low-precision base, put the LoRA back in fp32 and draw its initial weights again."""
    fixed = 0
    for layer in layers:
        base = getattr(layer, "base_layer", None)
        if not isinstance(base, FrozenLowPrecisionLinear):
            continue
        for name in getattr(layer, "active_adapters", ["default"]):
            if layer.lora_A[name].weight.dtype != torch.float32:
                layer.lora_A[name].to(torch.float32)
                layer.lora_B[name].to(torch.float32)
                layer.reset_lora_parameters(name, True)
                fixed += 1
    return fixed


__all__ = ["FrozenLowPrecisionLinear", "FP8_DTYPES", "to_fp8", "fp8_linear", "is_4bit", "dequantize_nf4",
           "quantize_nf4", "nf4_linear", "to_nf4", "frozen_linear", "offload_linears", "replace_linears",
           "low_precision_layers", "float_dtype", "keep_adapters_fp32", "set_module", "compute_dtype"]
