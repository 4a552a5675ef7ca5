"""blocks_to_swap for FLUX.1: the frozen weights of the transformer's last blocks stay in CPU memory and are copied
to the GPU layer by layer as they run (forward, checkpointed recompute and backward alike), so a 12B transformer
trains on a GPU that cannot hold it. The LoRA weights, the optimizer state, norms and the blocks before stay on the
GPU.

The count means what it means in kohya's flux_train_network.py, so its configs carry over: N swaps N // 2 double
blocks and (N - N // 2) * 2 single blocks (a double block is about two single blocks' weights), the last ones of
each kind. Weights are streamed per layer rather than whole blocks moved in and out, so no block has to stay behind
as a landing place: every block may be swapped (38 for FLUX.1's 19 + 38).
"""
from __future__ import annotations

from ...config import ConfigError


def split(count: int, doubles: int, singles: int) -> tuple[int, int]:
    """(double, single) blocks that blocks_to_swap `count` swaps on a transformer with that many of each."""
    double = count // 2
    single = (count - double) * 2
    if double > doubles or single > singles:
        most = max(n for n in range(count + 1) if n // 2 <= doubles and (n - n // 2) * 2 <= singles)
        raise ConfigError(f"blocks_to_swap: {count} would swap {double} double and {single} single blocks; this "
                          f"transformer has {doubles} and {singles}: at most blocks_to_swap: {most}")
    return double, single


def swapped_blocks(transformer, count: int) -> list:
    """The blocks whose frozen weights blocks_to_swap `count` keeps on the CPU: the last of each kind."""
    if not count:
        return []
    doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    double, single = split(count, len(doubles), len(singles))
    return doubles[len(doubles) - double:] + singles[len(singles) - single:]


def swap_blocks(transformer, count: int) -> tuple[int, int]:
    """Offloads the frozen Linear weights of the swapped blocks; returns (blocks, bytes kept on the CPU)."""
    from ..low_precision import offload_linears

    blocks = swapped_blocks(transformer, count)
    return len(blocks), sum(offload_linears(block) for block in blocks)
