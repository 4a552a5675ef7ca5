"""LoRA files whose modules are fused in the file but separate in the model we train (FLUX.1's qkv, linear1).

We train one LoRA of rank r per separate module (diffusers' to_q, to_k, to_v, ...). The file holds what the
hosts expect: one module per fused weight. Parts i = 1..k with down_i [r, in], up_i [out_i, r], alpha are
written exactly as
    down = [down_1; ...; down_k]           [k*r, in]
    up   = block_diag(up_1, ..., up_k)     [sum out_i, k*r]
    alpha' = k * alpha                     (alpha'/(k*r) = alpha/r: the same scale)
so up @ down * alpha'/(k*r) stacks the parts' deltas and nothing else. Readers (diffusers, kohya) recognise the
block-diagonal up and split it back without loss; so does `split` here, for resuming.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError


@dataclass(frozen=True)
class FusedGroup:
    stem: str                 # the file's stem, e.g. lora_unet_double_blocks_0_img_attn_qkv
    parts: tuple[str, ...]    # our stems of the separate modules, in the fused weight's order
    out_sizes: tuple[int, ...]  # their output features (rows of each part in the fused weight)


class FileLayout:
    """Maps our per-module LoRA weights to the file's (fused) modules and back; no groups: identity."""

    def __init__(self, groups: list[FusedGroup]):
        self.groups = groups

    def to_file(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(sd)
        for g in self.groups:
            downs = [out.pop(f"{p}.lora_down.weight") for p in g.parts]
            ups = [out.pop(f"{p}.lora_up.weight") for p in g.parts]
            alpha_tensors = [out.pop(f"{p}.alpha") for p in g.parts]
            alphas = {float(a) for a in alpha_tensors}
            if len(alphas) != 1 or len({d.shape[0] for d in downs}) != 1:
                raise ValueError(f"{g.stem}: the fused parts must share rank and alpha")
            out[f"{g.stem}.lora_down.weight"] = torch.cat(downs, dim=0)
            out[f"{g.stem}.lora_up.weight"] = torch.block_diag(*ups)
            out[f"{g.stem}.alpha"] = torch.tensor(len(g.parts) * alphas.pop(), dtype=alpha_tensors[0].dtype)
        return out

    def from_file(self, sd: dict[str, torch.Tensor], source: str = "LoRA file") -> dict[str, torch.Tensor]:
        out = dict(sd)
        for g in self.groups:
            if f"{g.stem}.lora_down.weight" not in out:
                continue  # check_file reports the missing module
            down = out.pop(f"{g.stem}.lora_down.weight")
            up = out.pop(f"{g.stem}.lora_up.weight")
            k = len(g.parts)
            if down.shape[0] % k or up.shape[0] != sum(g.out_sizes):
                raise ConfigError(f"{source}: {g.stem} has shape {list(up.shape)} x {list(down.shape)}, not "
                                  f"{k} fused parts of {list(g.out_sizes)} outputs")
            r = down.shape[0] // k
            blocks, row = [], 0
            for i, size in enumerate(g.out_sizes):
                rows = up[row:row + size]
                blocks.append(rows[:, i * r:(i + 1) * r])
                rest = torch.cat([rows[:, :i * r], rows[:, (i + 1) * r:]], dim=1)
                if rest.numel() and rest.abs().max() > 0:
                    raise ConfigError(f"{source}: {g.stem} is one LoRA over the whole fused weight (its up matrix "
                                      f"is not block-diagonal); it can be used in a host but not continued here, "
                                      f"where each of its {k} parts has its own LoRA")
                row += size
            alpha = out.pop(f"{g.stem}.alpha", torch.tensor(float(down.shape[0])))
            for i, part in enumerate(g.parts):
                out[f"{part}.lora_down.weight"] = down[i * r:(i + 1) * r]
                out[f"{part}.lora_up.weight"] = blocks[i]
                out[f"{part}.alpha"] = torch.tensor(float(alpha) / k, dtype=alpha.dtype)
        return out


def layout_of(targets: dict, component_modules) -> FileLayout:
    """The groups the targets ask for (Target.fused), with the parts' output sizes from the modules."""
    groups: dict[str, list] = {}
    for component, ts in targets.items():
        for t in ts:
            if t.fused:
                groups.setdefault(t.fused, []).append((t, component))
    out = []
    for stem, members in groups.items():
        sizes = tuple(component_modules(c).get_submodule(t.module).weight.shape[0] for t, c in members)
        out.append(FusedGroup(stem, tuple(t.kohya for t, _ in members), sizes))
    return FileLayout(out)
