"""The background job runner on the standalone host: start, poll events to the end, stop, resume, failures."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from lora_trainer.config import ConfigError
from lora_trainer.hosts.standalone import StandaloneHost
from lora_trainer.network.kohya_file import read_lora
from lora_trainer.ui.jobs import TERMINAL, JobError, JobRunner

from conftest import base_config, make_images

quiet = lambda *_: None  # noqa: E731


@pytest.fixture
def setup(tiny_files, tmp_path):
    data = make_images(tmp_path / "data", n=4)
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs", log=quiet)
    return host, data, JobRunner()


def _cfg(data, host, **kw):
    keys = dict(train_data_dir=str(data), output_dir=str(host.work_dir()), output_name="style", max_train_steps=4,
                sample_steps=3, caption_prefix="zzstyle", learning_rate=5e-2)
    keys.update(kw)
    return base_config(**keys)


def _poll_to_end(runner, timeout=300):
    seen, index, deadline = [], 0, time.time() + timeout
    while time.time() < deadline:
        events, index = runner.events_since(index)
        seen += events
        st = runner.status()
        if st["state"] in TERMINAL and not st.get("phase"):  # (the card's preview follows "finished")
            events, index = runner.events_since(index)
            return seen + events
        time.sleep(0.1)
    raise AssertionError(f"the job did not end: {runner.status()}")


def test_job_runs_to_the_end_installs_the_file_and_previews_prove_it(setup):
    from peft.tuners.lora import LoraLayer

    host, data, runner = setup
    assert runner.status() == {"id": None, "state": "idle"}
    job = runner.start(_cfg(data, host, save_steps=2), host)
    assert job.run_dir == host.work_dir() / "style"
    with pytest.raises(JobError, match="already running"):
        runner.start(_cfg(data, host), host)
    events = _poll_to_end(runner)
    kinds = [e["kind"] for e in events]
    assert kinds.index("started") < kinds.index("step") < kinds.index("finished")
    steps = [e["step"] for e in events if e["kind"] == "step"]
    assert steps == [1, 2, 3, 4]
    st = runner.status()
    assert st["state"] == "finished" and st["step"] == st["total_steps"] == 4 and st["error"] is None
    lora = host.lora_dir() / "style.safetensors"
    assert Path(st["lora_path"]) == lora and lora.is_file()
    assert json.loads(lora.with_suffix(".json").read_text())["activation text"] == "zzstyle"
    assert Path(st["preview_path"]) == lora.with_suffix(".png") and lora.with_suffix(".png").is_file()
    assert [c["step"] for c in st["checkpoints"]] == [2] and Path(st["checkpoints"][0]["lora"]).is_file()
    assert any("installed" in e["message"] for e in events)
    sd, meta = read_lora(lora)
    assert meta["ss_output_name"] == "style" and meta["ss_steps"] == "4"
    # the host's model is clean again: the trainer's LoRA layers were taken out
    model = host.base_model()
    assert not any(isinstance(m, LoraLayer) for m in model.unet.modules())
    assert not model.unet.training
    # the preview loads the FILE: weight 0 equals the base model, weight 1 differs
    base = np.asarray(host.preview("zzstyle, red square", None, 0.0, 11, 3, 64))
    w0 = np.asarray(host.preview("zzstyle, red square", "style", 0.0, 11, 3, 64))
    w1 = np.asarray(host.preview("zzstyle, red square", "style", 1.0, 11, 3, 64))
    assert np.array_equal(base, w0)
    assert np.abs(base.astype(int) - w1.astype(int)).mean() > 0.5
    # a checkpoint's preview goes through a staged copy that is gone afterwards: no stray cards in the host
    from lora_trainer.ui.controller import INSTALLED, TabController

    ctl = TabController(host, runner)
    image, msg, params = ctl.generate("zzstyle, red square", "style", "step 2", 1.0, 11, 3, "64")
    assert image is not None and "style-step000002-" in msg, msg
    # the preview says how it was made, in the WebUIs' PNG-info form (what their Send to txt2img reads)
    assert "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64" in msg
    assert params.startswith("zzstyle, red square, <lora:style-step000002-") and params == image.info["parameters"]
    image, msg, params = ctl.generate("zzstyle, red square", "style", INSTALLED, 0.5, 12, 3, "64")
    assert params.splitlines()[0] == "zzstyle, red square, <lora:style:0.5>" and "Seed: 12" in params
    assert "removed after use" not in msg
    assert not (host.lora_dir() / "lora-trainer-previews").exists()
    assert all("step" not in name for name in host.list_loras())
    # a second run of the same name never replaces the first
    first_bytes = lora.read_bytes()
    runner.start(_cfg(data, host, save_steps=0), host)
    _poll_to_end(runner)
    st2 = runner.status()
    assert st2["state"] == "finished" and Path(st2["lora_path"]).name == "style_2.safetensors"
    assert lora.read_bytes() == first_bytes and read_lora(lora)[1]["ss_session_id"] == meta["ss_session_id"]


def test_stop_saves_a_checkpoint_and_resume_finishes(setup):
    host, data, runner = setup
    cfg = _cfg(data, host, max_train_steps=8, output_name="resumable")
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        runner.start(cfg, host, resume=True)  # nothing to resume yet: said at once, not in the log later
    job = runner.start(cfg, host, preview_after=False)
    deadline = time.time() + 300
    while job.step < 2 and not job.done and time.time() < deadline:
        time.sleep(0.02)
    assert runner.stop()
    _poll_to_end(runner)
    st = runner.status()
    assert st["state"] == "stopped" and 2 <= st["step"] < 8 and st["lora_path"] is None
    assert Path(st["last_checkpoint"]).name == f"checkpoint-{st['step']}"
    assert not (host.lora_dir() / "resumable.safetensors").exists()
    assert not runner.stop()  # nothing running any more
    stopped_at = st["step"]
    with pytest.raises(ConfigError, match="lora_rank 4 -> 32"):  # named at Start, before anything loads
        runner.start(cfg.replace(lora_rank=32), host, resume=True)
    runner.start(cfg, host, resume=True, preview_after=False)
    events = _poll_to_end(runner)
    st = runner.status()
    assert st["state"] == "finished" and st["step"] == 8
    assert any("resumed from" in e["message"] for e in events)
    assert (host.lora_dir() / "resumable.safetensors").is_file()
    # the loss curve spans the whole run across the stop, not only the resumed part
    assert [s for s, _ in runner.job.losses] == list(range(1, 9))
    assert stopped_at < 8


def test_one_click_resume_uses_the_runs_own_settings(setup):
    from lora_trainer.ui.controller import TabController

    host, data, runner = setup
    ctl = TabController(host, runner)
    assert ctl.resume_run("")[2].startswith("not resumed: no stopped run")
    job = runner.start(_cfg(data, host, max_train_steps=6, output_name="oneclick", save_steps=1), host,
                       preview_after=False)
    deadline = time.time() + 300
    while not job.checkpoints and not job.done and time.time() < deadline:
        time.sleep(0.02)
    assert job.checkpoints and not job.done
    assert not ctl.run_choices()  # a run that is going on is not offered for resume, checkpoint or not
    runner.stop()
    _poll_to_end(runner)
    labels = ctl.run_choices()
    assert labels and labels[0].startswith("oneclick - step ")
    restored = ctl.restore()  # what a reloaded page shows
    assert restored["values"]["output_name"] == "oneclick" and restored["folder"] == str(data)
    assert restored["view"]["run"].startswith("stopped: oneclick")
    values, folder, msg = ctl.resume_run(labels[0])
    assert msg.startswith("resuming oneclick") and values["max_train_steps"] == "6" and folder == str(data)
    _poll_to_end(runner)
    assert runner.status()["state"] == "finished" and runner.status()["step"] == 6
    # the page reloaded after that resume: its form starts a new run under a new name (a live A1111 refused it:
    # the resumed run's "resume from latest" came back with the form)
    values = ctl.restore()["values"]
    assert values["output_name"] == "oneclick" and not values.get("resume_from_checkpoint")
    msg, _memory = ctl.start(dict(values, output_name="after_resume", max_train_steps="1"), str(data))
    assert msg.startswith("started after_resume"), msg
    _poll_to_end(runner)
    assert runner.status()["state"] == "finished"


def test_failures_reach_the_status_with_a_message(setup, tmp_path):
    host, data, runner = setup
    with pytest.raises(ConfigError, match="train_data_dir"):
        runner.start(_cfg(data, host, train_data_dir=None), host)
    with pytest.raises(ConfigError, match="does not exist"):
        runner.start(_cfg(tmp_path / "missing", host), host)
    with pytest.raises(ConfigError, match="text-generation"):
        runner.start(_cfg(data, host, task_type="text-generation"), host)
    empty = tmp_path / "empty"
    empty.mkdir()
    runner.start(_cfg(empty, host), host)
    events = _poll_to_end(runner)
    st = runner.status()
    assert st["state"] == "failed" and st["error"]
    assert [e for e in events if e["kind"] == "failed"]  # exactly the engine's message, once
    assert len([e for e in events if e["kind"] == "failed"]) == 1
    # a host that cannot load its model fails the job with its message (no traceback for the person)
    broken = StandaloneHost(str(tmp_path / "nope.safetensors"), tmp_path / "Lora2", log=quiet)
    runner.start(_cfg(data, broken, base_model=None), broken)
    _poll_to_end(runner)
    st = runner.status()
    assert st["state"] == "failed" and "cannot load the base model" in st["error"]


def test_training_a_name_again_after_deleting_its_lora_installs_the_plain_name(setup):
    """An older run folder of the same name must not make the new LoRA `style_2` when models/Lora has no `style`."""
    host, data, runner = setup
    runner.start(_cfg(data, host, max_train_steps=1, log_with="none"), host, preview_after=False)
    _poll_to_end(runner)
    first = Path(runner.status()["lora_path"])
    assert first.name == "style.safetensors"
    first.unlink()  # the person deletes the LoRA from the WebUI's folder
    runner.start(_cfg(data, host, max_train_steps=1, log_with="none"), host, preview_after=False)
    _poll_to_end(runner)
    assert Path(runner.status()["lora_path"]).name == "style.safetensors"
    # and when the LoRA folder does hold the name, the new one is numbered and the person is told
    runner.start(_cfg(data, host, max_train_steps=1, log_with="none"), host, preview_after=False)
    events = _poll_to_end(runner)
    assert Path(runner.status()["lora_path"]).name == "style_2.safetensors"
    assert any("already exists" in e["message"] for e in events)


def test_the_end_of_a_run_says_what_it_does_and_finished_comes_once_the_lora_is_installed(setup, monkeypatch):
    from lora_trainer.ui.controller import format_status

    host, data, runner = setup
    phases, at_card = [], {}
    real_preview = host.preview

    def card_preview(*args, **kwargs):
        at_card.update(runner.status())
        return real_preview(*args, **kwargs)

    monkeypatch.setattr(host, "preview", card_preview)
    job = runner.start(_cfg(data, host, output_name="phases", sample_prompts=["a red square", "a blue square"],
                            sample_every_n_steps=0), host)
    job.events.subscribe(lambda e: phases.append(e.data.get("phase")) if e.data and "phase" in e.data else None)
    _poll_to_end(runner)
    assert [p for p in phases if p.startswith("rendering sample")] == ["rendering sample 1/2", "rendering sample 2/2"]
    assert "saving the LoRA" in phases
    # while the card's picture renders, the LoRA is installed and the run already says finished
    assert at_card["state"] == "finished" and Path(at_card["lora_path"]).is_file()
    assert at_card["phase"] == "rendering the LoRA card's preview"
    assert format_status(at_card).startswith("finished: phases") and "rendering the LoRA card's preview" in \
        format_status(at_card)
    st = runner.status()
    assert st["phase"] == "" and Path(st["preview_path"]).is_file()
