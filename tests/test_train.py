"""End-to-end training on tiny real models: CLI, resume, stop, failures, loss."""
import json
import math

import pytest
import torch

from lora_trainer.cli import main
from lora_trainer.config import ConfigError
from lora_trainer.models.loader import load_base_model
from lora_trainer.network.kohya_file import read_lora
from lora_trainer.train.events import EventBus
from lora_trainer.train.trainer import Trainer, TrainingFailed

from conftest import assert_stop_then_resume_is_exact, base_config, make_images

quiet = dict(log_fn=lambda *_: None)


def _write_yaml(path, **keys):
    import yaml

    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.mark.parametrize("family,source", [("sd1", "file"), ("sd2", "folder"), ("sdxl", "file")])
def test_cli_trains_each_family(tiny_files, tiny_folders, tmp_path, family, source, capsys):
    data = make_images(tmp_path / "data", n=4)
    base = tiny_files[family] if source == "file" else tiny_folders[family]
    cfg = _write_yaml(tmp_path / "my_style.yaml", base_model=str(base), train_data_dir=str(data),
                      output_dir=str(tmp_path / "out"), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                      bucket_reso_steps=32, batch_size=2, max_train_steps=4, lora_rank=4, learning_rate=1e-3,
                      train_text_encoder=True, log_with="tensorboard", save_steps=2)
    assert main(["train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    lora = tmp_path / "out" / "my_style.safetensors"  # output_name defaults to the config file's name
    assert lora.is_file() and "<lora:my_style:0.8>" in out
    sd, meta = read_lora(lora)
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4"
    assert json.loads(meta["ss_tag_frequency"])["data"]["simple background"] == 4
    assert meta["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")
    # the shapes kohya writes, which the WebUIs' metadata dialogs parse
    buckets = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in buckets["buckets"].values()) == 4 and buckets["mean_img_ar_error"] >= 0
    assert all(len(b["resolution"]) == 2 and all(isinstance(x, int) for x in b["resolution"])
               for b in buckets["buckets"].values())
    assert all(int(d["img_count"]) >= 0 for d in json.loads(meta["ss_dataset_dirs"]).values())
    assert meta["ss_sd_model_name"] == (base.name if source == "file" else base.name)
    te_prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
    assert any(k.startswith(te_prefix) for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    # the LoRA learned something (B is no longer zero)
    assert any(torch.count_nonzero(v) for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()
    assert list((tmp_path / "out" / "checkpoint-2").glob("my_style-step00000002.safetensors"))
    runs = [d for d in (tmp_path / "out" / "logs").iterdir() if d.is_dir()]  # one TensorBoard run per training run
    assert len(runs) == 1 and runs[0].name.startswith("my_style-") and list(runs[0].glob("events.out.tfevents.*"))
    sidecar = json.loads((tmp_path / "out" / "my_style.json").read_text())
    assert sidecar["sd version"] == {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[family]


def _resume_config(tiny_files, tmp_path, out, **extra):
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, n=5)
    keys = dict(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(out),
                output_name="r", max_train_steps=8, gradient_accumulation_steps=2, lr_scheduler="cosine",
                lr_warmup_steps=2, lora_dropout=0.1, shuffle_caption=True, caption_dropout_rate=0.2,
                flip_aug=True, noise_offset=0.05, min_snr_gamma=5.0, save_precision="fp32", train_text_encoder=True)
    return base_config(**{**keys, **extra})


def test_stop_then_resume_is_exact(tiny_files, tmp_path):
    assert_stop_then_resume_is_exact(lambda out, **kw: _resume_config(tiny_files, tmp_path, out, **kw), 3, 8,
                                     tmp_path / "a", tmp_path / "b")


def test_resume_latest_and_bad_checkpoint_path(tiny_files, tmp_path):
    cfg = _resume_config(tiny_files, tmp_path, tmp_path / "c", save_steps=4)
    Trainer(cfg).run()
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        Trainer(cfg.replace(resume_from_checkpoint=str(tmp_path / "nowhere"))).run()
    events = EventBus()
    result = Trainer(cfg.replace(resume_from_checkpoint="latest", overwrite=False), events).run()
    assert result.global_step == 8
    assert any("resumed from" in e.message and "checkpoint-4" in e.message for e in events.since(0)[0])
    assert result.lora_path.name == "r_2.safetensors"  # never silently overwrites the first run's file


def test_training_lowers_the_loss_on_its_images(tiny_files, tmp_path):
    from lora_trainer.data import build_dataset
    from lora_trainer.train.loss import diffusion_loss, diffusion_target

    data = make_images(tmp_path / "data", n=2, sizes=((64, 64),))
    cfg = base_config(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=40, learning_rate=3e-3, lora_rank=8)
    model = load_base_model(str(tiny_files["sd1"]), **quiet)
    trainer = Trainer(cfg, model=model, keep_network=True)
    trainer.run()
    ds = build_dataset(cfg, log=None)
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([ds.load_sample(i, 0, 0)["pixels"] for i in range(2)])
    from lora_trainer.models.base import encode_prompts

    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
        emb, _, _ = encode_prompts(model, [ds.caption_for(i, 0, 0) for i in range(2)])
        totals = {}
        for weight in (0.0, 1.0):
            total = 0.0
            for _ in range(8):
                noise = torch.randn(latents.shape, generator=g)
                t = torch.randint(0, 1000, (2,), generator=g)
                noisy = model.noise_scheduler.add_noise(latents, noise, t)
                with trainer.network.multiplier(weight):
                    pred = model.unet(noisy, t, encoder_hidden_states=emb).sample
                total += diffusion_loss(pred, diffusion_target(model.noise_scheduler, latents, noise, t), t,
                                        model.noise_scheduler, None).item()
            totals[weight] = total
            g.manual_seed(0)
    assert totals[1.0] < 0.9 * totals[0.0], totals


def test_nan_loss_stops_with_a_message_and_keeps_checkpoint(tiny_files, tmp_path, monkeypatch):
    from lora_trainer.train import kinds as trainer_mod  # the SD kind computes the loss

    cfg = _resume_config(tiny_files, tmp_path, tmp_path / "n", save_steps=2)
    real = trainer_mod.diffusion_loss
    calls = {"n": 0}  # 5 images, batch 2, accumulation 2: steps take 2, 1, 2, 1 micro-batches

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(trainer_mod, "diffusion_loss", poisoned)
    events = EventBus()
    with pytest.raises(TrainingFailed, match="loss became nan at step 4.*checkpoint-2"):
        Trainer(cfg, events).run()
    assert events.last.kind == "failed" and "learning_rate" in events.last.message
    assert (tmp_path / "n" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (tmp_path / "n" / "r.safetensors").exists()


def test_init_lora_weights_continues_and_refuses_mismatch(tiny_files, tmp_path):
    first = Trainer(_resume_config(tiny_files, tmp_path, tmp_path / "i1", max_train_steps=2)).run()
    events = EventBus()
    cont = Trainer(_resume_config(tiny_files, tmp_path, tmp_path / "i2", max_train_steps=2,
                                  init_lora_weights=str(first.lora_path)), events).run()
    assert cont.status == "finished"
    assert any("incremental" in e.message for e in events.since(0)[0])
    with pytest.raises(ConfigError, match="rank"):
        Trainer(_resume_config(tiny_files, tmp_path, tmp_path / "i3", max_train_steps=2, lora_rank=8,
                               init_lora_weights=str(first.lora_path))).run()
    xl_cfg = _resume_config(tiny_files, tmp_path, tmp_path / "i4", max_train_steps=2,
                            init_lora_weights=str(first.lora_path)).replace(base_model=str(tiny_files["sdxl"]))
    with pytest.raises(ConfigError, match="SD1"):
        Trainer(xl_cfg).run()


def test_samples_and_gradient_checkpointing(tiny_files, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    cfg = base_config(base_model=str(tiny_files["sdxl"]), train_data_dir=str(data), output_dir=str(tmp_path / "s"),
                      max_train_steps=2, gradient_checkpointing=True, sample_prompts=["red square"],
                      sample_every_n_steps=1, sample_steps=2, cache_latents_to_disk=True, conv_lora=True)
    events = EventBus()
    result = Trainer(cfg, events).run()
    samples = [e.path for e in events.since(0)[0] if e.kind == "sample"]
    assert len(samples) == 2  # step 1 and the final one
    from PIL import Image

    assert Image.open(samples[0]).size == (64, 64)
    assert list((tmp_path / "s" / "cache").iterdir())  # latents cached on disk
    assert result.status == "finished"


def test_cli_names_bad_config_keys(tmp_path, capsys):
    cfg = _write_yaml(tmp_path / "bad.yaml", base_model="x", learnig_rate=1e-4)
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key 'learnig_rate'; did you mean 'learning_rate'" in capsys.readouterr().err
    cfg = _write_yaml(tmp_path / "bad2.yaml", base_model="x", batch_size=0)
    assert main(["train", "--config", str(cfg)]) == 2
    assert "batch_size: 0 is too small" in capsys.readouterr().err
    assert main(["train", "--config", str(_write_yaml(tmp_path / "ok.yaml", base_model=str(tmp_path / "none.ckpt"),
                                                     train_data_dir=str(tmp_path)))]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sigint_saves_a_resumable_checkpoint(tiny_files, tmp_path):
    """Ctrl-C in the CLI: the run stops at the next step with a checkpoint, exit code 130, and resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = make_images(tmp_path / "data", n=4)
    cfg = _write_yaml(tmp_path / "sig.yaml", base_model=str(tiny_files["sd1"]), train_data_dir=str(data),
                      output_dir=str(tmp_path / "out"), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                      bucket_reso_steps=32, batch_size=1, max_train_steps=100000, lora_rank=4, log_with="none")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    seen = ""
    deadline = time.time() + 240
    while "training SD1" not in seen and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    time.sleep(2.0)  # a few steps in
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, seen + rest
    assert "plus --resume_from_checkpoint" in rest  # the CLI says how to go on (the tab has its button)
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] >= 1
    assert not (tmp_path / "out" / "sig.safetensors").exists()


def test_out_of_memory_gives_remedies(tiny_files, tmp_path, monkeypatch):
    from lora_trainer.train import kinds as trainer_mod  # the SD kind computes the loss

    data = make_images(tmp_path / "data", n=2)
    cfg = base_config(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=2)

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_mod, "diffusion_loss", oom)
    events = EventBus()
    with pytest.raises(TrainingFailed, match="gradient_checkpointing"):
        Trainer(cfg, events).run()
    assert events.last.kind == "failed" and "batch_size" in events.last.message


def test_a_given_model_gets_its_modules_back(tiny_files, tmp_path):
    from peft.tuners.lora import LoraLayer

    data = make_images(tmp_path / "data", n=2)
    model = load_base_model(str(tiny_files["sd1"]), **quiet)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    Trainer(base_config(base_model="unused", train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                        max_train_steps=1, train_text_encoder=True), model=model).run()
    assert not any(isinstance(m, LoraLayer) for c in [model.unet, *model.text_encoders] for m in c.modules())
    after = model.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bf16_mixed_precision_keeps_frozen_weights_in_bf16(tiny_files, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    cfg = base_config(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(tmp_path / "o"),
                      max_train_steps=2, mixed_precision="bf16")
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.status == "finished" and all(math.isfinite(x) for x in result.losses)
    assert next(trainer.model.unet.conv_in.parameters()).dtype == torch.bfloat16  # no fp32 copy of the UNet
    assert next(trainer.model.vae.parameters()).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())


def test_a_new_run_never_writes_into_an_earlier_runs_checkpoints(tiny_files, tmp_path):
    cfg = _resume_config(tiny_files, tmp_path, tmp_path / "again", save_steps=2, max_train_steps=4,
                         log_with="tensorboard")
    Trainer(cfg).run()
    with pytest.raises(ConfigError, match="resume_from_checkpoint: latest.*overwrite: true"):
        Trainer(cfg).run()
    events = EventBus()
    Trainer(cfg.replace(overwrite=True), events).run()  # start over: the old checkpoints are kept aside
    previous = list((tmp_path / "again").glob("previous-*/checkpoint-*"))
    assert previous and any("moved them to" in e.message for e in events.since(0)[0])
    assert len([d for d in (tmp_path / "again" / "logs").iterdir() if d.is_dir()]) == 2
