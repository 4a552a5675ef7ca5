"""fp8_base: the frozen FLUX.1 transformer stored in float8_e4m3fn while a full-precision LoRA trains on top (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.cli import main
from lora_trainer.models.flux import tiny
from lora_trainer.models.low_precision import FrozenLowPrecisionLinear
from lora_trainer.network.kohya_file import read_lora

from conftest import base_config, make_images
from test_flux_train import _write_yaml, fixed_batch_losses, flux_dir  # noqa: F401 (a fixture)


def test_cli_fp8_base_writes_the_same_kohya_file_as_a_full_precision_run(flux_dir, tmp_path, capsys):
    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    keys = dict(base_model=str(flux_dir), train_data_dir=str(data), resolution=64, min_bucket_reso=64,
                max_bucket_reso=64, bucket_reso_steps=32, batch_size=2, max_train_steps=2, lora_rank=4,
                learning_rate=1e-3, log_with="none", save_precision="fp32")
    files = {}
    for fp8 in (False, True):
        out = tmp_path / f"out-{fp8}"
        cfg = _write_yaml(tmp_path / f"flux_{fp8}.yaml", output_dir=str(out), fp8_base=fp8, **keys)
        assert main(["train", "--config", str(cfg)]) == 0
        files[fp8], meta = read_lora(out / f"flux_{fp8}.safetensors")
        assert meta["ss_fp8_base"] == str(fp8)
        said = capsys.readouterr()
        assert ("stored in float8_e4m3fn" in said.out + said.err) == fp8
    assert files[True].keys() == files[False].keys()
    assert all(files[True][k].shape == files[False][k].shape for k in files[False])
    assert {v.dtype for v in files[True].values()} == {torch.float32}
    assert any(torch.count_nonzero(v) for k, v in files[True].items() if k.endswith("lora_up.weight"))


def test_fp8_base_trains_with_the_transformer_held_in_fp8(flux_dir, tmp_path):
    from lora_trainer.train.trainer import Trainer

    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(base_model=str(flux_dir), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=30, learning_rate=3e-3, lora_rank=8, resolution=64, max_bucket_reso=64,
                      fp8_base=True, mixed_precision="bf16")
    seen = []

    def check_storage(event):  # during the run: the frozen weights are fp8 at every step, the loss finite
        if event.kind == "step":
            layers = [m for m in trainer.model.transformer.modules() if type(m) is FrozenLowPrecisionLinear]
            seen.append((event.loss, {m.weight.dtype for m in layers}, {m.weight.element_size() for m in layers}))

    trainer = Trainer(cfg, keep_network=True)
    trainer.events.subscribe(check_storage)
    result = trainer.run()
    assert result.status == "finished" and len(seen) == 30
    assert all(math.isfinite(loss) and dtypes == {torch.float8_e4m3fn} and sizes == {1}
               for loss, dtypes, sizes in seen), seen[:2]
    model = trainer.model
    wrapped = [m for m in model.transformer.modules() if type(m) is FrozenLowPrecisionLinear]
    # every Linear of the transformer is stored in fp8; the only plain Linears left are the LoRAs' own (fp32)
    assert len(wrapped) == len(tiny_linears())
    plain = [m for m in model.transformer.modules() if type(m) is torch.nn.Linear]
    assert plain and {m.weight.dtype for m in plain} == {torch.float32}
    assert {p.dtype for p in trainer.network.parameters()} == {torch.float32}
    assert sum(m.weight.nbytes for m in wrapped) == sum(m.weight.numel() for m in wrapped)

    totals = fixed_batch_losses(cfg, model, trainer.network, autocast=torch.bfloat16)
    assert all(torch.isfinite(torch.tensor(v)) for v in totals.values())
    assert totals[1.0] < 0.9 * totals[0.0], totals


def tiny_linears():
    return [m for m in tiny.tiny_transformer().modules() if type(m) is torch.nn.Linear]


def test_fp8_base_is_refused_for_stable_diffusion(tmp_path):
    from lora_trainer.config import ConfigError
    from lora_trainer.train.kinds import SDKind

    with pytest.raises(ConfigError, match="fp8_base"):
        SDKind().load(base_config(base_model=str(tmp_path / "sd.safetensors"), fp8_base=True), print, None)


def test_the_text_trainers_4bit_key_on_flux_names_the_image_trainers_keys():
    from lora_trainer.config import ConfigError

    with pytest.raises(ConfigError, match="nf4_base: true, the transformer in 4-bit nf4, and fp8_base: true"):
        base_config(model_family="flux", load_in_4bit=True)
