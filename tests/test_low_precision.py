"""Frozen low-precision Linear layers (models/low_precision.py): fp8 storage cast per call, packed 4-bit weights
dequantized per call and cut into row groups, under peft's LoRA with gradients reaching the input."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.models.low_precision import (FrozenLowPrecisionLinear, dequantize_nf4, fp8_linear,
                                               keep_adapters_fp32, to_fp8)


def _linear(seed=0, i=16, o=12):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_layer_computes_with_its_upcast_weight_and_passes_gradients_to_the_input(dtype):
    ref = _linear()
    layer = fp8_linear(ref, dtype)
    assert layer.weight.dtype == dtype and layer.weight.element_size() == 1
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(x, ref.weight.detach().to(dtype).float(), ref.bias.detach())
    assert torch.equal(y, expected)
    y.sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad)
    assert not layer.weight.requires_grad and layer.weight.grad is None
    with torch.autocast("cpu", torch.bfloat16):  # computes in autocast's dtype, not the stored one
        assert layer(x).dtype == torch.bfloat16


def test_backward_keeps_no_upcast_weight_and_gives_the_same_gradient():
    ref = _linear()
    layer = fp8_linear(ref)
    x = torch.randn(3, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (12, 16) not in saved  # the bf16/fp32 copy of the weight is not held until backward
    (y * torch.arange(12.0)).sum().backward()
    w = ref.weight.detach().to(torch.float8_e4m3fn).float()
    assert torch.allclose(x.grad, (torch.ones(3, 1) * torch.arange(12.0)) @ w)
    with torch.autocast("cpu", torch.bfloat16):
        x.grad = None
        layer(x).float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_through_a_low_precision_layer(reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = fp8_linear(_linear())
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    plain, x.grad = x.grad, None
    checkpoint(lambda t: layer(t).pow(2), x, use_reentrant=reentrant).sum().backward()
    assert torch.allclose(x.grad, plain)


def test_a_scaled_fp8_weight_is_multiplied_by_its_scale():
    ref = _linear()
    w8 = (ref.weight.detach() / 4).to(torch.float8_e4m3fn)
    layer = FrozenLowPrecisionLinear(w8, None, 16, 12, scale=torch.tensor(4.0))
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), x @ (w8.float() * 4).T)


def test_float_dtype_looks_past_low_precision_storage():
    from lora_trainer.models.low_precision import float_dtype

    model = torch.nn.Sequential(fp8_linear(torch.nn.Linear(16, 12, bias=False)),
                                torch.nn.LayerNorm(12, dtype=torch.bfloat16))
    assert float_dtype(model) == torch.bfloat16
    model[0].weight = _packed(torch.randn(12, 16))
    assert float_dtype(model) == torch.bfloat16


def test_moves_and_casts_keep_the_fp8_storage():
    model = torch.nn.Sequential(_linear(), torch.nn.LayerNorm(12))
    assert to_fp8(model) == 1
    model.to(dtype=torch.bfloat16)
    assert model[0].weight.dtype == torch.float8_e4m3fn
    assert model[0].bias.dtype == torch.bfloat16 and model[1].weight.dtype == torch.bfloat16


def test_peft_wraps_the_fp8_layer_and_keeps_the_lora_in_fp32():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("proj", fp8_linear(_linear()))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["proj"]), model)
    keep_adapters_fp32([model.proj])
    assert type(model.proj.base_layer) is FrozenLowPrecisionLinear
    assert model.proj.lora_A["default"].weight.dtype == torch.float32
    assert model.proj.lora_B["default"].weight.dtype == torch.float32
    assert torch.count_nonzero(model.proj.lora_A["default"].weight)
    x = torch.randn(2, 16, requires_grad=True)
    model.proj.lora_B["default"].weight.data.fill_(0.1)
    model(x).sum().backward()
    assert model.proj.lora_A["default"].weight.grad is not None and x.grad is not None


class _Packed(torch.nn.Parameter):
    """Stands in for bitsandbytes' Params4bit: opaque uint8 data and a quant_state with the real shape."""


def _packed(weight: torch.Tensor):
    p = _Packed(weight.to(torch.float16).view(torch.uint8), requires_grad=False)  # 2 bytes a weight, opaque
    p.quant_state = type("QuantState", (), {"shape": torch.Size(weight.shape)})()
    return p


def _unpack(p):
    return p.view(torch.float16).view(p.quant_state.shape)


def test_a_packed_fused_weight_is_dequantized_then_cut_into_its_parts():
    fused = torch.randn(12, 8)
    packed = _packed(fused)
    parts = [FrozenLowPrecisionLinear(packed, None, 8, 4, rows=((4 * i, 4 * i + 4),), dequantize=_unpack)
             for i in range(3)]
    swapped = FrozenLowPrecisionLinear(packed, None, 8, 12, rows=((6, 12), (0, 6)), dequantize=_unpack)
    x = torch.randn(2, 8, requires_grad=True)
    ref = x @ fused.half().float().T
    assert torch.allclose(torch.cat([p(x) for p in parts], dim=1), ref)
    assert torch.allclose(swapped(x), torch.cat([ref[:, 6:], ref[:, :6]], dim=1))
    assert all(p.weight.data_ptr() == packed.data_ptr() for p in parts)  # one packed tensor, no copies
    parts[1](x).sum().backward()
    assert x.grad is not None


def test_nf4_without_bitsandbytes_says_what_to_do(monkeypatch):
    import sys

    from lora_trainer.models.low_precision import quantize_nf4

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    for call in (lambda: dequantize_nf4(_packed(torch.randn(4, 4))), lambda: quantize_nf4(torch.randn(4, 4))):
        with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
            call()


def test_nf4_layer_computes_with_its_dequantized_weight_and_moves_packed():
    """Real bitsandbytes nf4 (>= 0.46 quantizes on the CPU; on CUDA when there is one)."""
    bnb = pytest.importorskip("bitsandbytes")
    from lora_trainer.models.low_precision import nf4_linear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = _linear().to(device, torch.bfloat16)
    layer = nf4_linear(ref, device)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 16 * 12 // 2  # two weights a byte
    deq = bnb.functional.dequantize_4bit(layer.weight, quant_state=layer.weight.quant_state)
    assert deq.shape == ref.weight.shape and 0 < (deq - ref.weight).abs().max() < 0.5 * ref.weight.abs().max()
    x = torch.randn(3, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, deq, ref.bias))
    layer(x).sum().backward()
    assert x.grad is not None and not layer.weight.requires_grad
    layer.to("meta")  # a move keeps the packed data packed (never dequantized into the module)
    assert layer.weight.dtype == torch.uint8 and layer.weight.device.type == "meta" and "nf4" in repr(layer)
