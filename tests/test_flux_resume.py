"""FLUX.1 runs stop and resume exactly: the continued run ends on the same LoRA and losses as an uninterrupted one
(noise, sigmas, caption dropout, optimizer and LR schedule all restored), with CLIP-L trained too."""
from __future__ import annotations

import pytest

from lora_trainer.models.flux import tiny
from lora_trainer.network.kohya_file import read_lora

from conftest import assert_stop_then_resume_is_exact, base_config, make_images


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
    straight = assert_stop_then_resume_is_exact(lambda out, **kw: _config(flux_dir, tmp_path, out, **kw), 2, 6,
                                                tmp_path / "a", tmp_path / "b")
    weights, meta = read_lora(straight.lora_path)
    assert any(k.startswith("lora_te1_") for k in weights) and meta["ss_base_model_version"] == "flux1"
