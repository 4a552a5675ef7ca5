"""The factor sets of LoRA, LoHa and LoKr, and the layer that applies one (optionally as DoRA).

Each factor set knows its update to the base weight, `delta()` (scale included), and the tensors it is stored
as in a kohya/LyCORIS-style file. The formulas are the ones the hosts use when they load such a file:

- LoRA:  dW = scale * up @ down                                  (`lora_up.weight`, `lora_down.weight`)
- LoHa:  dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b)               (`hada_w1_a` ... `hada_w2_b`; a 3x3
         convolution with use_tucker stores each pair around a core `hada_t1`/`hada_t2`)
- LoKr:  dW = scale * kron(w1, w2); w1 may be split into `lokr_w1_a @ lokr_w1_b` (decompose_both) and w2 into
         `lokr_w2_a @ lokr_w2_b` (unless it is kept full); with no split at all the hosts use scale 1.

scale = alpha / rank. With DoRA the layer's weight becomes m * (W + dW) / ||W + dW||, the norm taken per input
channel (over the output axis and the kernel), which is how A1111 and Forge apply a `dora_scale` of shape
[1, in, 1, 1]; `dora_scale` holds m.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = m * n with m <= n: m = factor when it divides dim, else the divisor closest to sqrt(dim) that is
    not larger than factor (when factor > 0)."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = int(math.isqrt(dim))
    if factor > 0:
        limit = min(limit, factor)
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


class Factors(nn.Module):
    """The trained tensors of one module; subclasses define the update and the file layout."""
    kind = ""

    def __init__(self, shape: torch.Size, rank: int, alpha: float):
        super().__init__()
        self.shape = tuple(shape)        # the base weight's shape: [out, in] or [out, in, kh, kw]
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def training_params_need_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """suffix -> tensor, as stored after `<stem>.` in the file (alpha included)."""
        out = {name: p for name, p in self.named_parameters()}
        out["alpha"] = torch.tensor(self.alpha)
        return out

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for name, p in self.named_parameters():
            if name not in tensors:
                raise ConfigError(f"{where}: no {name} (the file is not a {self.kind} of this layout)")
            value = tensors[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ConfigError(f"{where}: {name} has shape {list(value.shape)} but this run trains "
                                  f"{list(p.shape)}; set the rank / factor options the file was trained with")
            p.copy_(value)
        if "alpha" in tensors:
            file_alpha = float(tensors["alpha"])
            if abs(file_alpha - self.alpha) > 1e-6 * max(1.0, abs(self.alpha)):
                raise ConfigError(f"{where}: alpha {file_alpha:g} but this run uses {self.alpha:g} (set lora_alpha / "
                                  f"conv_alpha to the file's)")

    @property
    def conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def flat_in(self) -> int:
        return int(math.prod(self.shape[1:]))


class LoRAFactors(Factors):
    kind = "LoRA"

    def __init__(self, shape, rank, alpha, **_):
        super().__init__(shape, rank, alpha)
        out, inp = self.shape[0], self.shape[1]
        kernel = self.shape[2:]
        self.down = nn.Parameter(_kaiming(torch.empty(rank, inp, *kernel)))
        self.up = nn.Parameter(torch.zeros(out, rank, *[1] * len(kernel)))

    def delta(self) -> torch.Tensor:
        return (self.up.reshape(self.shape[0], -1) @ self.down.reshape(self.rank, -1)).reshape(self.shape) * self.scale

    def file_tensors(self):
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "alpha": torch.tensor(self.alpha)}

    def load_file_tensors(self, tensors, where):
        renamed = {"down": tensors.get("lora_down.weight"), "up": tensors.get("lora_up.weight"),
                   "alpha": tensors.get("alpha")}
        if renamed["down"] is not None and renamed["down"].shape[0] != self.rank:
            raise ConfigError(f"{where}: rank {renamed['down'].shape[0]} but this run trains rank {self.rank} (set "
                              f"lora_rank / conv_rank to the file's rank)")
        super().load_file_tensors({k: v for k, v in renamed.items() if v is not None}, where)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[r, r, kh, kw] core with a: [r, out], b: [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a)


class LoHaFactors(Factors):
    kind = "LoHa"

    def __init__(self, shape, rank, alpha, use_tucker=False, **_):
        super().__init__(shape, rank, alpha)
        out, inp = self.shape[0], self.shape[1]
        self.tucker = bool(use_tucker) and self.conv and self.shape[2:] != (1, 1)
        if self.tucker:
            kernel = self.shape[2:]
            self.hada_t1 = nn.Parameter(torch.randn(rank, rank, *kernel) * 0.1)
            self.hada_w1_a = nn.Parameter(torch.randn(rank, out) * 0.1)
            self.hada_w1_b = nn.Parameter(torch.randn(rank, inp))
            self.hada_t2 = nn.Parameter(torch.randn(rank, rank, *kernel) * 0.1)
            self.hada_w2_a = nn.Parameter(torch.zeros(rank, out))
            self.hada_w2_b = nn.Parameter(torch.randn(rank, inp))
        else:
            # one product starts at zero, so a new LoHa changes nothing; the other carries the gradient
            self.hada_w1_a = nn.Parameter(torch.randn(out, rank) * 0.1)
            self.hada_w1_b = nn.Parameter(torch.randn(rank, self.flat_in))
            self.hada_w2_a = nn.Parameter(torch.zeros(out, rank))
            self.hada_w2_b = nn.Parameter(torch.randn(rank, self.flat_in))

    def delta(self) -> torch.Tensor:
        if self.tucker:
            one = _tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            two = _tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            one = self.hada_w1_a @ self.hada_w1_b
            two = self.hada_w2_a @ self.hada_w2_b
        return (one * two).reshape(self.shape) * self.scale


class LoKrFactors(Factors):
    kind = "LoKr"

    def __init__(self, shape, rank, alpha, lokr_factor=-1, decompose_both=False, lokr_full_rank=False,
                 use_tucker=False, **_):
        super().__init__(shape, rank, alpha)
        out_l, out_k = factorization(self.shape[0], lokr_factor)
        in_m, in_n = factorization(self.shape[1], lokr_factor)
        kernel = self.shape[2:]
        flat_kernel = int(math.prod(kernel)) if kernel else 1
        # the small factor w1: [out_l, in_m]
        self.split_w1 = bool(decompose_both) and rank < max(out_l, in_m) / 2
        if self.split_w1:
            self.lokr_w1_a = nn.Parameter(_kaiming(torch.empty(out_l, rank)))
            self.lokr_w1_b = nn.Parameter(_kaiming(torch.empty(rank, in_m)))
        else:
            self.lokr_w1 = nn.Parameter(_kaiming(torch.empty(out_l, in_m)))
        # the large factor w2: [out_k, in_n, *kernel]; it starts at zero
        self.split_w2 = not lokr_full_rank and rank < max(out_k, in_n) / 2
        self.tucker = self.split_w2 and bool(use_tucker) and self.conv and kernel != (1, 1)
        if not self.split_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.randn(rank, rank, *kernel) * 0.1)
            self.lokr_w2_a = nn.Parameter(torch.zeros(rank, out_k))
            self.lokr_w2_b = nn.Parameter(_kaiming(torch.empty(rank, in_n)))
        else:
            self.lokr_w2_a = nn.Parameter(torch.zeros(out_k, rank))
            self.lokr_w2_b = nn.Parameter(_kaiming(torch.empty(rank, in_n * flat_kernel)))
        if not self.split_w1 and not self.split_w2:
            self.scale = 1.0  # the hosts ignore alpha when nothing is split (there is no rank to divide by)

    def w1(self) -> torch.Tensor:
        return self.lokr_w1_a @ self.lokr_w1_b if self.split_w1 else self.lokr_w1

    def w2(self) -> torch.Tensor:
        if not self.split_w2:
            return self.lokr_w2
        if self.tucker:
            return _tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return self.lokr_w2_a @ self.lokr_w2_b

    def delta(self) -> torch.Tensor:
        w1, w2 = self.w1(), self.w2()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(self.shape) * self.scale


FACTORS = {"lora": LoRAFactors, "locon": LoRAFactors, "loha": LoHaFactors, "lokr": LoKrFactors}


def input_channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W|| per input channel (over the output axis and the kernel), shaped [1, in, 1, ...]."""
    w = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return w.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


class AdaptedLayer(nn.Module):
    """A Linear or Conv2d plus a factor set: y = base(x) + multiplier * op(dropout(x), W_eff - W)."""

    def __init__(self, base: nn.Module, factors: Factors, use_dora: bool = False, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.factors = factors
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.dropouts_on = False  # set by the network while it trains (and only with gradients on)
        self.dora_scale: Optional[nn.Parameter] = None
        if use_dora:
            self.dora_scale = nn.Parameter(input_channel_norm(base.weight.detach().float()))

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        if isinstance(b, nn.Conv2d):
            return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, weight)

    def effective_delta(self, training: bool = False) -> torch.Tensor:
        """W_eff - W at multiplier 1, in float32: what a host adds to the weight when it loads the file."""
        dw = self.factors.delta().float()
        if training and self.rank_dropout:
            keep = (torch.rand(dw.shape[0], device=dw.device) >= self.rank_dropout).to(dw.dtype)
            dw = dw * keep.reshape(-1, *[1] * (dw.dim() - 1)) / (1.0 - self.rank_dropout)
        if self.dora_scale is None:
            return dw
        w = self.base_layer.weight.float()
        merged = w + dw
        return merged * (self.dora_scale / input_channel_norm(merged)) - w

    def _delta_out(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.dropout:
            x = F.dropout(x, self.dropout)
        return self._op(x, self.effective_delta(training).to(x.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.multiplier == 0:
            return y
        training = self.dropouts_on and torch.is_grad_enabled()
        if training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return y
        if torch.is_grad_enabled() and self.factors.training_params_need_grad():
            # The full-size update is rebuilt in the backward pass instead of being kept: without this every
            # adapted layer would hold one to three weight-sized tensors until the backward (LoHa on SD 1.5: +10 GB).
            out = checkpoint(self._delta_out, x, training, use_reentrant=False)
        else:
            out = self._delta_out(x, training)
        return y + out.to(y.dtype) * self.multiplier
