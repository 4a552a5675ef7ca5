"""FLUX.1 with frozen text encoders: every caption and sample prompt is encoded before training, then T5 and CLIP
leave the device (T5-XXL is ~9 GiB in bf16); training and samples read the cache, and the LoRA is the one a run
that keeps the encoders gets."""
from __future__ import annotations

import pytest
from transformers import T5EncoderModel

from lora_trainer.models.flux import tiny
from lora_trainer.network.kohya_file import read_lora
from lora_trainer.train.events import EventBus
from lora_trainer.train.flux_kind import FluxKind
from lora_trainer.train.trainer import Trainer

from conftest import base_config, make_images


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny.write_tiny_flux_folder(tmp_path_factory.mktemp("tiny-flux") / "tiny-flux")


def _run(flux_dir, tmp_path, out, monkeypatch, **extra):
    """Trains; returns (result, log lines, T5 calls before 'started', T5 calls in all)."""
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, n=3, sizes=((64, 64),))
    cfg = base_config(base_model=str(flux_dir), train_data_dir=str(data), output_dir=str(out), output_name="t",
                      max_train_steps=4, caption_dropout_rate=0.3, caption_prefix="zzt", save_precision="fp32",
                      max_bucket_reso=64, sample_prompts=["zzt, a red square"], sample_every_n_steps=2,
                      sample_steps=2, **extra)
    calls = {"n": 0, "at_start": None}
    forward = T5EncoderModel.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", counting)
    events, lines = EventBus(), []

    def on_event(e):
        if e.kind == "message":
            lines.append(e.message)
        if e.kind == "started":
            calls["at_start"] = calls["n"]

    events.subscribe(on_event)
    result = Trainer(cfg, events).run()
    monkeypatch.setattr(T5EncoderModel, "forward", forward)
    assert result.status == "finished"
    return result, lines, calls["at_start"], calls["n"]


def test_text_is_encoded_up_front_and_the_encoders_leave(flux_dir, tmp_path, monkeypatch):
    released, lines, at_start, total = _run(flux_dir, tmp_path, tmp_path / "a", monkeypatch)
    # 3 captions + "" (caption dropout) + 1 sample prompt, in one call; none during training or the samples
    assert at_start == 1 and total == 1, (at_start, total)
    assert any("5 captions and sample prompts encoded; the text encoders" in m and "moved to the CPU" in m
               for m in lines), lines
    assert list((tmp_path / "a" / "samples").glob("*.png"))  # samples rendered from the cache

    monkeypatch.setattr(FluxKind, "releases_text_encoders", lambda self, cfg: False)
    kept, lines_kept, _, total_kept = _run(flux_dir, tmp_path, tmp_path / "b", monkeypatch)
    assert total_kept > 1 and not any("moved to the CPU" in m for m in lines_kept)
    a, _ = read_lora(released.lora_path)
    b, _ = read_lora(kept.lora_path)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert released.losses == pytest.approx(kept.losses, abs=1e-6)


def test_shuffled_captions_keep_the_encoders_and_say_why(flux_dir, tmp_path, monkeypatch):
    _, lines, at_start, total = _run(flux_dir, tmp_path, tmp_path / "s", monkeypatch, shuffle_caption=True)
    assert at_start == 0 and total > 1
    assert any("text encoders stay on the cpu for the whole run: captions change from draw to draw" in m
               for m in lines), lines


def test_a_trained_clip_keeps_the_encoders(flux_dir, tmp_path, monkeypatch):
    result, lines, at_start, _ = _run(flux_dir, tmp_path, tmp_path / "c", monkeypatch, train_text_encoder=True)
    assert at_start == 0 and not any("moved to the CPU" in m for m in lines)
    assert any(k.startswith("lora_te1_") for k in read_lora(result.lora_path)[0])
