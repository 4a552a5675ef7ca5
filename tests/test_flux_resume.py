"""FLUX.1 runs stop and resume exactly: the continued run ends on the same LoRA and losses as an uninterrupted one
(noise, sigmas, caption dropout, optimizer and LR schedule all restored), with CLIP-L trained too."""
from __future__ import annotations

import pytest

from lora_trainer.models.flux import tiny
from lora_trainer.network.kohya_file import read_lora
from lora_trainer.train.control import StopFlag
from lora_trainer.train.events import EventBus
from lora_trainer.train.trainer import Trainer

from conftest import base_config, make_images


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny.write_tiny_flux_folder(tmp_path_factory.mktemp("tiny-flux") / "tiny-flux")


def _config(flux_dir, tmp_path, out, **extra):
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, n=3, sizes=((64, 64),))
    keys = dict(base_model=str(flux_dir), train_data_dir=str(data), output_dir=str(out), output_name="f",
                max_train_steps=6, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=1,
                caption_dropout_rate=0.3, timestep_sampling="flux_shift", save_precision="fp32",
                train_text_encoder=True, max_bucket_reso=64)
    return base_config(**{**keys, **extra})


def test_flux_stop_then_resume_is_exact(flux_dir, tmp_path):
    straight = Trainer(_config(flux_dir, tmp_path, tmp_path / "a")).run()
    assert straight.status == "finished" and straight.global_step == 6

    events, stop = EventBus(), StopFlag()
    events.subscribe(lambda e: stop.set("test") if e.kind == "step" and e.step == 2 else None)
    first = Trainer(_config(flux_dir, tmp_path, tmp_path / "b"), events, stop).run()
    assert first.status == "stopped" and first.global_step == 2 and first.lora_path is None

    resumed = Trainer(_config(flux_dir, tmp_path, tmp_path / "b", resume_from_checkpoint=str(first.checkpoint))).run()
    assert resumed.status == "finished" and resumed.global_step == 6
    a, meta = read_lora(straight.lora_path)
    b, _ = read_lora(resumed.lora_path)
    assert a.keys() == b.keys() and any(k.startswith("lora_te1_") for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert straight.losses[2:] == pytest.approx(resumed.losses, abs=1e-6)
    assert meta["ss_base_model_version"] == "flux1"
