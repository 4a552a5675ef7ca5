"""A diffusers FluxTransformer2DModel on the tensors of a live BFL-layout transformer module (a WebUI's loaded Flux),
whatever their storage: float (views), fp8 (kept fp8, cast per layer) or bitsandbytes nf4 (dequantized per call).

The diffusers model is built on the meta device from stand-ins of the BFL weights' shapes (so its config comes
from the same code as a BFL file's), then every Linear is replaced by one that computes from the live module's
own tensor: a plain nn.Linear holding row views where the storage is float, a `FrozenLowPrecisionLinear` where
it is fp8 or nf4 or where diffusers orders the rows differently (final_layer's shift/scale halves). Nothing of
the live module is copied except the q/k norm scales when they are fp8 (a few hundred numbers a block, which
diffusers' RMSNorm cannot multiply in fp8).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..loader import ModelLoadError
from ..low_precision import FP8_DTYPES, FrozenLowPrecisionLinear, dequantize_nf4, is_4bit, set_module
from .bfl_names import all_linear_modules, bfl_shape, norm_params, out_features
from .loader import transformer_from_bfl


def _logical_shape(layer) -> tuple[int, ...]:
    weight = layer.weight
    return tuple(weight.quant_state.shape) if is_4bit(weight) else tuple(weight.shape)


def _stand_ins(root: torch.nn.Module, linears: dict, norms: list) -> dict:
    """Meta tensors of the shapes a BFL state dict of this module has (what transformer_from_bfl reads)."""
    sd = {}
    for path, layer in linears.items():
        sd[f"{path}.weight"] = torch.empty(_logical_shape(layer), device="meta")
        if layer.bias is not None:
            sd[f"{path}.bias"] = torch.empty(tuple(layer.bias.shape), device="meta")
    for bfl, _ in norms:
        sd[bfl] = torch.empty(tuple(root.get_parameter(bfl).shape), device="meta")
    return sd


def _part_layer(layer, rows: tuple[tuple[int, int], ...], dequantize: Callable) -> torch.nn.Module:
    """The diffusers module computing `rows` of the live BFL `layer`."""
    weight, bias = layer.weight, layer.bias
    in_features = _logical_shape(layer)[1]
    out = sum(b - a for a, b in rows)
    scale = getattr(layer, "scale_weight", None)
    plain = not is_4bit(weight) and weight.dtype not in FP8_DTYPES and scale is None
    if plain and len(rows) == 1:  # float storage: row views, an ordinary Linear
        (a, b), = rows
        linear = torch.nn.Linear(in_features, out, bias=bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight[a:b], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[a:b], requires_grad=False)
        return linear
    if not is_4bit(weight) and len(rows) == 1:
        (a, b), = rows
        return FrozenLowPrecisionLinear(weight[a:b], None if bias is None else bias[a:b], in_features, out,
                                        scale=scale)
    return FrozenLowPrecisionLinear(weight, bias, in_features, out, rows=rows, scale=scale,
                                    dequantize=dequantize if is_4bit(weight) else None)


def transformer_from_live(root: torch.nn.Module, compute_dtype: torch.dtype,
                          dequantize: Optional[Callable] = None):
    """root: a module under BFL's names (double_blocks.N.img_attn.qkv, ...) whose Linear-like layers have
    `.weight` and `.bias` (any class: WebUIs use their own). compute_dtype: what fp8 norm scales become.
    dequantize: packed 4-bit weight -> float weight (default: bitsandbytes)."""
    dequantize = dequantize or dequantize_nf4
    names = dict(root.named_parameters())
    num_double, num_single, guidance = bfl_shape(names)
    if not num_double and not num_single:
        raise ModelLoadError("the loaded model has no double_blocks / single_blocks: not a FLUX.1 transformer")
    fused = all_linear_modules(num_double, num_single, guidance)
    norms = norm_params(num_double, num_single)
    try:
        linears = {m.bfl: root.get_submodule(m.bfl) for m in fused}
    except AttributeError as exc:
        raise ModelLoadError(f"the loaded FLUX.1 transformer is laid out differently than BFL's: {exc}") from None
    model = transformer_from_bfl(_stand_ins(root, linears, norms))  # on meta: the structure and config only
    sizes = out_features(model)
    for m in fused:
        layer, start = linears[m.bfl], 0
        for part in m.parts:
            rows = ((start, start + sizes[part]),)
            start += sizes[part]
            if m.swap_halves:  # diffusers keeps (scale, shift) where BFL keeps (shift, scale)
                half = sizes[part] // 2
                rows = ((half, 2 * half), (0, half))
            set_module(model, part, _part_layer(layer, rows, dequantize))
    for bfl, diff in norms:
        scale = root.get_parameter(bfl)
        if scale.dtype in FP8_DTYPES:
            scale = scale.to(compute_dtype)
        owner, _, name = diff.rpartition(".")
        model.get_submodule(owner)._parameters[name] = torch.nn.Parameter(scale, requires_grad=False)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ModelLoadError(f"FLUX.1 transformer weights not found in the loaded model: {left[:3]}")
    model.requires_grad_(False)
    return model


__all__ = ["transformer_from_live"]
