"""FLUX.1 on small GPUs: blocks_to_swap (frozen block weights kept in CPU memory, streamed in per layer) and
nf4_base (the frozen transformer in bitsandbytes' 4-bit nf4), through the trainer on a tiny Flux (CPU)."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from lora_trainer.config import ConfigError
from lora_trainer.models.flux import tiny
from lora_trainer.models.flux.block_swap import split, swap_blocks, swapped_blocks
from lora_trainer.models.low_precision import FrozenLowPrecisionLinear
from lora_trainer.network.kohya_file import read_lora

from conftest import base_config, make_images


@pytest.fixture(scope="module")
def deep_flux_dir(tmp_path_factory):
    """Two double and four single blocks: enough for blocks_to_swap 2 (one double, two single) to leave some."""
    return tiny.write_tiny_flux_folder(tmp_path_factory.mktemp("deep-flux") / "flux", num_double=2, num_single=4)


def test_blocks_to_swap_counts_as_kohya_does_and_says_the_limit():
    assert split(18, 19, 38) == (9, 18) and split(35, 19, 38) == (17, 36) and split(1, 19, 38) == (0, 2)
    assert split(38, 19, 38) == (19, 38)  # streamed per layer: no block has to stay behind
    assert split(4, 2, 4) == (2, 4)
    with pytest.raises(ConfigError, match="would swap 2 double and 6 single blocks; this transformer has 2 and 4: "
                                          "at most blocks_to_swap: 4"):
        split(5, 2, 4)
    transformer = tiny.tiny_transformer(num_double=2, num_single=4)
    chosen = swapped_blocks(transformer, 2)
    assert chosen == [transformer.transformer_blocks[1], *transformer.single_transformer_blocks[2:]]
    assert swapped_blocks(transformer, 0) == []


def test_swapped_layers_stay_in_cpu_memory_when_the_model_moves_and_are_fetched_per_call():
    transformer = tiny.tiny_transformer(num_double=2, num_single=4)
    before = [b.proj_out.weight.detach().clone() for b in transformer.single_transformer_blocks]
    blocks, size = swap_blocks(transformer, 2)
    swapped = {id(m) for b in swapped_blocks(transformer, 2) for m in b.modules()}
    layers = [m for m in transformer.modules() if isinstance(m, FrozenLowPrecisionLinear)]
    assert blocks == 3 and layers and all(id(m) in swapped and m.offloaded for m in layers)
    assert size == sum(m.weight.nbytes for m in layers)
    # the same values, kept as they were stored (no cast)
    assert all(torch.equal(b.proj_out.weight, w) for b, w in zip(transformer.single_transformer_blocks, before))
    transformer.to("meta")  # any move: the swapped weights stay where they are, everything else goes
    for name, p in transformer.named_parameters():
        kept = any(name.endswith(".weight") and p is m.weight for m in layers)
        assert p.device.type == ("cpu" if kept else "meta"), name
    layer = layers[0]
    w, b = layer.materialize(torch.bfloat16, torch.device("meta"))  # fetched to the compute device for the call
    assert w.device.type == "meta" and w.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"
    assert "offloaded" in repr(layer) and b.device.type == "meta"  # the small bias moves with the module


def _run(folder, data, out, **keys):
    from lora_trainer.train.trainer import Trainer

    said = []
    cfg = base_config(base_model=str(folder), train_data_dir=str(data), output_dir=str(out), output_name="swap",
                      max_train_steps=4, resolution=64, max_bucket_reso=64, save_precision="fp32", **keys)
    trainer = Trainer(cfg, log=said.append, keep_network=True)
    result = trainer.run()
    assert result.status == "finished"
    return trainer, read_lora(out / "swap.safetensors"), "\n".join(said)


@pytest.mark.parametrize("fp8", [False, True])
def test_training_with_blocks_swapped_gives_the_lora_of_a_run_without(deep_flux_dir, tmp_path, fp8):
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    _, (plain, _), _ = _run(deep_flux_dir, data, tmp_path / "plain", fp8_base=fp8)
    trainer, (swapped, meta), said = _run(deep_flux_dir, data, tmp_path / "swapped", fp8_base=fp8, blocks_to_swap=2)
    assert "blocks_to_swap: 2: the frozen weights of 3 transformer blocks" in said
    offloaded = [m for m in trainer.model.transformer.modules()
                 if isinstance(m, FrozenLowPrecisionLinear) and m.offloaded]
    fresh = tiny.tiny_transformer(num_double=2, num_single=4)
    linears = [m for b in swapped_blocks(fresh, 2) for m in b.modules() if type(m) is torch.nn.Linear]
    assert len(offloaded) == len(linears)  # every frozen Linear of the swapped blocks, no other
    assert swapped.keys() == plain.keys()
    for key in plain:  # per-layer streaming changes where weights live, not what is computed
        assert torch.allclose(swapped[key], plain[key], rtol=1e-5, atol=1e-7), key
    assert any(torch.count_nonzero(v) for k, v in swapped.items() if k.endswith("lora_up.weight"))


def test_blocks_to_swap_beyond_the_model_fails_before_training(deep_flux_dir, tmp_path):
    from lora_trainer.train.trainer import Trainer

    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(base_model=str(deep_flux_dir), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=2, blocks_to_swap=6)
    with pytest.raises(ConfigError, match="at most blocks_to_swap: 4"):
        Trainer(cfg).run()
    assert not list((tmp_path / "o").glob("*.safetensors"))


def test_stable_diffusion_refuses_the_flux_memory_keys(tmp_path):
    from lora_trainer.train.kinds import SDKind

    for key, value in (("nf4_base", True), ("blocks_to_swap", 4)):
        with pytest.raises(ConfigError, match=f"{key}: {0 if key == 'blocks_to_swap' else 'false'}"):
            SDKind().load(base_config(base_model=str(tmp_path / "sd.safetensors"), **{key: value}), print, None)
    with pytest.raises(ConfigError, match="choose one"):
        base_config(fp8_base=True, nf4_base=True)


def test_nf4_base_without_bitsandbytes_stops_before_the_model_loads(deep_flux_dir, tmp_path, monkeypatch):
    from lora_trainer.models.flux import loader
    from lora_trainer.train.trainer import Trainer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    monkeypatch.setattr(loader, "load_flux", lambda *a, **k: pytest.fail("loaded the model"))
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(base_model=str(deep_flux_dir), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=2, nf4_base=True)
    with pytest.raises(ConfigError, match="nf4_base needs bitsandbytes: pip install bitsandbytes"):
        Trainer(cfg).run()


def test_nf4_base_trains_a_float_lora_on_a_4bit_transformer(deep_flux_dir, tmp_path):
    """Real bitsandbytes nf4 (on the CPU with bitsandbytes >= 0.46): the frozen transformer stays packed at every
    step, the LoRA is fp32 and learns, and the file is the one a float run writes (same keys and shapes)."""
    pytest.importorskip("bitsandbytes")
    from test_flux_train import fixed_batch_losses

    from lora_trainer.train.trainer import Trainer

    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(base_model=str(deep_flux_dir), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      output_name="nf4", max_train_steps=30, learning_rate=3e-3, lora_rank=8, resolution=64,
                      max_bucket_reso=64, nf4_base=True, mixed_precision="bf16", save_precision="fp32")
    seen = []

    def check_storage(event):
        if event.kind == "step":
            layers = [m for m in trainer.model.transformer.modules() if type(m) is FrozenLowPrecisionLinear]
            seen.append((event.loss, {m.weight.dtype for m in layers},
                         all(m.weight.quant_state is not None for m in layers)))

    said = []
    trainer = Trainer(cfg, log=said.append, keep_network=True)
    trainer.events.subscribe(check_storage)
    assert trainer.run().status == "finished" and len(seen) == 30
    assert all(math.isfinite(loss) and dtypes == {torch.uint8} and packed for loss, dtypes, packed in seen)
    assert any("stored in nf4" in line for line in said)
    assert {p.dtype for p in trainer.network.parameters()} == {torch.float32}
    totals = fixed_batch_losses(cfg, trainer.model, trainer.network, autocast=torch.bfloat16)
    assert totals[1.0] < 0.9 * totals[0.0], totals

    float_run, _ = _run(deep_flux_dir, data, tmp_path / "float", lora_rank=8)[1]
    nf4_file, meta = read_lora(tmp_path / "o" / "nf4.safetensors")
    assert nf4_file.keys() == float_run.keys() and meta["ss_fp8_base"] == "False"
    assert all(nf4_file[k].shape == float_run[k].shape and nf4_file[k].dtype == torch.float32 for k in nf4_file)

    # and with blocks swapped on top: packed weights streamed per layer
    trainer, (both, _), said = _run(deep_flux_dir, data, tmp_path / "both", nf4_base=True, blocks_to_swap=2,
                                    mixed_precision="bf16")
    assert both.keys() == float_run.keys() and "stored in nf4" in said and "blocks_to_swap: 2" in said


def test_dora_on_a_swapped_base_is_refused_with_what_to_change():
    from test_flux_network import _bundle

    from lora_trainer.network.base import create_network

    model = _bundle(num_double=2, num_single=4)
    swap_blocks(model.unet, 2)
    with pytest.raises(ConfigError, match="streamed from CPU memory.*blocks_to_swap: 0"):
        create_network(model, base_config(use_dora=True))
