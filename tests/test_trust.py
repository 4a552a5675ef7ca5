"""Fault injection: hostile files and requests, kills, full disks, bad names. Each test does the bad thing for real
(a pickle that would create a marker file, SIGKILL, a tiny filesystem, a request for /etc/passwd) and checks that
nothing runs, nothing leaks, nothing half-written is left and the run can go on."""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_trainer.config import ConfigError, from_dict
from lora_trainer.network.kohya_file import read_lora
from lora_trainer.train import state as ckpt
from lora_trainer.train.control import StopFlag
from lora_trainer.train.events import EventBus
from lora_trainer.train.trainer import Trainer, TrainingFailed

from conftest import base_config, make_images

REPO = Path(__file__).resolve().parents[1]


def _cfg(tiny_files, tmp_path, **extra):
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, n=4)
    keys = dict(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(tmp_path / "out"),
                output_name="t", max_train_steps=4, save_precision="fp32")
    keys.update(extra)
    return base_config(**keys)


def _stopped_at(cfg, step: int):
    events, stop = EventBus(), StopFlag()
    events.subscribe(lambda e: stop.set("test") if e.kind == "step" and e.step == step else None)
    return Trainer(cfg, events, stop).run()


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ---- 1. no pickle in the training state ----------------------------------------------------------------
def test_checkpoints_hold_no_pickle_and_hostile_pickles_never_run(tiny_files, tmp_path):
    cfg = _cfg(tiny_files, tmp_path)
    first = _stopped_at(cfg, 2)
    folder = first.checkpoint
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))], files
    for name in files:  # every file is safetensors, JSON or YAML
        head = (folder / name).read_bytes()[:2]
        assert head != b"\x80\x04" and not head.startswith(b"PK"), name

    marker = tmp_path / "pwned"
    # a hostile old-format file beside the new files is never even opened
    torch.save({"x": Payload(marker)}, folder / ckpt.LEGACY_OPTIM_FILE)
    resumed = Trainer(cfg.replace(resume_from_checkpoint=str(folder))).run()
    assert resumed.status == "finished" and not marker.exists()

    # an old-format checkpoint whose optimizer.pt carries code: refused with a message, nothing runs
    legacy = tmp_path / "legacy" / "checkpoint-2"
    shutil.copytree(folder, legacy)
    for name in ckpt.OPTIM_FILES + ckpt.RNG_FILES:
        (legacy / name).unlink()
    with pytest.raises(ConfigError, match="old pickle format"):
        Trainer(cfg.replace(resume_from_checkpoint=str(legacy), output_dir=str(tmp_path / "legacy"))).run()
    assert not marker.exists()

    # an old-format checkpoint with a plain optimizer state and a hostile rng.pt: resumes (not bit-exact, said)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    state = ckpt.load_checkpoint(folder)
    torch.save(state["optim"], legacy / ckpt.LEGACY_OPTIM_FILE)
    with open(legacy / ckpt.LEGACY_RNG_FILE, "wb") as fh:
        pickle.dump({"python": Payload(marker), "torch": torch.get_rng_state()}, fh)
    events = EventBus()
    result = Trainer(cfg.replace(resume_from_checkpoint=str(legacy), output_dir=str(tmp_path / "legacy")),
                     events).run()
    assert result.status == "finished" and not marker.exists()
    messages = " ".join(e.message for e in events.since(0)[0])
    assert "not bit-exact" in messages and "old checkpoint format" in messages
    del opt


def test_resume_works_when_torch_load_is_wrapped_like_in_a1111(tiny_files, tmp_path, monkeypatch):
    """A1111 replaces torch.load with a checker that returns None for files current torch writes."""
    cfg = _cfg(tiny_files, tmp_path)
    first = _stopped_at(cfg, 2)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    resumed = Trainer(cfg.replace(resume_from_checkpoint=str(first.checkpoint))).run()
    assert resumed.status == "finished" and resumed.global_step == 4


def test_state_file_round_trip_keeps_types():
    from lora_trainer.train.statefile import pack, unpack

    import numpy as np

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"betas": (0.9, 0.99), "lr": 1e-4, "params": [0], "foreign_key": None}],
             "np": ("MT19937", np.arange(5, dtype=np.uint32), 7, 0, 0.0), "inf": float("inf"),
             "$tensor": "a key that looks like a tag"}
    doc, tensors = pack(state)
    back = unpack(json.loads(json.dumps(doc)), tensors)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.99) and back["inf"] == float("inf")
    assert back["np"][1].dtype == np.uint32 and back["np"][1].tolist() == [0, 1, 2, 3, 4]
    assert back["$tensor"] == "a key that looks like a tag"
    with pytest.raises(TypeError):
        pack({"f": lambda: 0})


def test_no_code_executing_load_anywhere_in_the_project():
    hits = []
    for path in list((REPO / "lora_trainer").rglob("*.py")) + list((REPO / "scripts").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for bad in ("weights_only=False", "pickle.load", "pickle.loads"):
            if bad in text:
                hits.append(f"{path.relative_to(REPO)}: {bad}")
    assert not hits, hits


# ---- kills, full disks, pipes, stops -----------------------------------------------------------------------
def _cli(tmp_path, tiny_files, out, **extra):
    import yaml

    data = tmp_path / "data"
    if not data.exists():
        make_images(data, n=4)
    keys = dict(base_model=str(tiny_files["sd1"]), train_data_dir=str(data), output_dir=str(out), output_name="k",
                resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32, batch_size=2,
                lora_rank=4, learning_rate=1e-3, log_with="none", seed=3, max_train_steps=6, save_steps=1,
                save_precision="fp32")
    keys.update(extra)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(keys))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return [sys.executable, "-m", "lora_trainer", "train", "--config", str(path)], env


def test_sigkill_inside_a_checkpoint_write_then_resume_matches_an_uninterrupted_run(tiny_files, tmp_path):
    cmd, env = _cli(tmp_path, tiny_files, tmp_path / "straight")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    straight, _ = read_lora(tmp_path / "straight" / "k.safetensors")

    out = tmp_path / "killed"
    cmd, env = _cli(tmp_path, tiny_files, out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            # the moment a checkpoint after the first is being written (a hidden temporary folder exists)
            temps = [p for p in out.glob(".checkpoint-*.tmp*")] if out.is_dir() else []
            if temps and (out / "checkpoint-1").is_dir():
                os.kill(proc.pid, signal.SIGKILL)
                break
            if (out / "checkpoint-4").is_dir():  # no write caught in the act: kill between steps instead
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    # the kill landed inside a write when its temporary folder is still there (the write may have just ended
    # between seeing the folder and the signal arriving)
    killed_in_write = bool(list(out.glob(".checkpoint-*.tmp*")))
    assert not (out / "k.safetensors").exists()
    for folder in out.glob("checkpoint-*"):  # no half checkpoint under a final name
        assert ckpt.is_checkpoint(folder) and ckpt.load_checkpoint(folder)["progress"]["global_step"] >= 1

    cmd, env = _cli(tmp_path, tiny_files, out, resume_from_checkpoint="latest")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    if killed_in_write:
        assert "left by an interrupted save" in done.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the killed run's temporary folder is gone
    resumed, _ = read_lora(out / "k.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6


def test_ctrl_c_with_output_into_a_dead_pipe_saves_and_exits_cleanly(tiny_files, tmp_path):
    """`train ... 2>&1 | tee log`, then Ctrl-C: tee dies first; the run must still checkpoint and exit."""
    out = tmp_path / "piped"
    cmd, env = _cli(tmp_path, tiny_files, out, max_train_steps=400, save_steps=0)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    deadline = time.time() + 300
    while b"/400" not in seen and time.time() < deadline:  # the progress bar shows a finished step
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    proc.stdout.close()  # the reader is gone: every later write hits a broken pipe
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    latest = ckpt.find_latest_checkpoint(out)
    assert latest is not None and ckpt.load_checkpoint(latest)["progress"]["global_step"] >= 1


def _tiny_fs(path: Path, size_bytes: int):
    """A real small filesystem when we may mount one (root), else None."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                       capture_output=True)
    return path if r.returncode == 0 else None


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(tiny_files, tmp_path, monkeypatch):
    probe = _stopped_at(_cfg(tiny_files, tmp_path, output_dir=str(tmp_path / "probe")), 1).checkpoint
    size = sum(p.stat().st_size for p in probe.iterdir())
    mount = _tiny_fs(tmp_path / "small", int(size * 2.5) // 4096 * 4096 + 4096)
    try:
        if mount is None:  # not root: the same failure, simulated at the write
            out = tmp_path / "small"
            calls = {"n": 0}
            real = ckpt.write_safetensors

            def failing(tensors, path, *a, **k):
                calls["n"] += 1
                if calls["n"] > 2:  # the third checkpoint's weights file
                    Path(path).write_bytes(b"partial")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(tensors, path, *a, **k)

            monkeypatch.setattr(ckpt, "write_safetensors", failing)
        else:
            out = mount
        cfg = _cfg(tiny_files, tmp_path, output_dir=str(out), save_steps=1, max_train_steps=8)
        events = EventBus()
        with pytest.raises(TrainingFailed) as info:
            Trainer(cfg, events).run()
        msg = str(info.value)
        assert "No space left on device" in msg and "free there" in msg and "last good checkpoint" in msg
        assert [e.kind for e in events.since(0)[0]][-1] == "failed"
        assert not [p.name for p in Path(out).iterdir() if p.name.startswith(".")]  # no temporary leftovers
        good = ckpt.find_latest_checkpoint(Path(out))
        assert good is not None and str(good) in msg
        assert ckpt.load_checkpoint(good)["progress"]["global_step"] >= 1  # intact and loadable
    finally:
        if mount is not None:  # lazily: tensors loaded above may still map a file on it
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_at_the_final_save_keeps_the_run_resumable(tiny_files, tmp_path, monkeypatch):
    import lora_trainer.fsutil as fsutil

    real_open = open

    class Full:
        def __init__(self, path, mode):
            self._fh = real_open(path, mode)

        def write(self, data):
            self._fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def full_for_the_lora(path, mode="r", *a, **k):
        if str(path).endswith("t.safetensors.tmp" + str(os.getpid())):
            return Full(path, mode)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(fsutil, "open", full_for_the_lora, raising=False)
    cfg = _cfg(tiny_files, tmp_path)
    with pytest.raises(TrainingFailed) as info:
        Trainer(cfg).run()
    msg = str(info.value)
    out = tmp_path / "out"
    assert "No space left on device" in msg and "checkpoint-4" in msg and "resume" in msg
    assert not (out / "t.safetensors").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(fsutil, "open", real_open, raising=False)
    events = EventBus()
    result = Trainer(cfg.replace(resume_from_checkpoint="latest"), events).run()
    assert result.status == "finished" and result.global_step == 4 and (out / "t.safetensors").is_file()
    assert not [e for e in events.since(0)[0] if e.kind == "step"]  # nothing retrained, only saved


def test_space_warning_before_training(tiny_files, tmp_path, monkeypatch):
    import lora_trainer.train.preflight as preflight

    monkeypatch.setattr(preflight, "free_space", lambda folder: 1000)
    events = EventBus()
    Trainer(_cfg(tiny_files, tmp_path, max_train_steps=1), events).run()
    warnings = [e.message for e in events.since(0)[0] if "free under" in e.message]
    assert warnings and "save_last_n_checkpoints" in warnings[0]


def test_stop_in_every_phase_ends_as_stopped(tiny_files, tmp_path, monkeypatch):
    import lora_trainer.train.sampling as sampling

    # before the first step (while loading / caching): stopped, not failed
    stop = StopFlag()
    stop.set("test")
    events = EventBus()
    result = Trainer(_cfg(tiny_files, tmp_path), events, stop).run()
    assert result.status == "stopped" and result.checkpoint is None
    assert [e.kind for e in events.since(0)[0]][-1] == "stopped"

    # during a sample render: the render ends at its next denoising step, the step's checkpoint is written once
    stop = StopFlag()
    real_render = sampling.render

    def render_then_stop(*a, **k):
        stop.set("stop pressed during a sample")
        return real_render(*a, **k)

    monkeypatch.setattr(sampling, "render", render_then_stop)
    events = EventBus()
    started = time.perf_counter()
    result = Trainer(_cfg(tiny_files, tmp_path, output_dir=str(tmp_path / "s"), sample_prompts=["a red square"],
                          sample_every_n_steps=1, sample_steps=1000, save_steps=1), events, stop).run()
    assert time.perf_counter() - started < 120
    assert result.status == "stopped" and result.global_step == 1
    saved = [e for e in events.since(0)[0] if e.kind == "checkpoint_saved"]
    assert [e.step for e in saved] == [1]  # the scheduled save and the stop do not both write it
    assert not list((tmp_path / "s").rglob("*.png"))  # the interrupted sample left no image, no temp file


def test_a_job_stopped_early_is_stopped_with_no_error(tiny_files, tmp_path):
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.jobs import JobRunner

    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs",
                          log=lambda *_: None)
    runner = JobRunner()
    data = make_images(tmp_path / "data", n=4)
    job = runner.start(base_config(train_data_dir=str(data), output_name="c", max_train_steps=50), host)
    job.events.subscribe(lambda e: runner.stop() if "latents" in e.message or e.kind == "step" else None)
    assert runner.wait(300)
    st = runner.status()
    assert st["state"] == "stopped" and st["error"] is None, st


# ---- names, paths and broken files, before anything loads ---------------------------------------------------
@pytest.mark.parametrize("name", ["name\0x", "x" * 121, "..", "a/b", "a\\b", "CON", "aux.txt", "bad:name", " x",
                                  "x."])
def test_bad_output_names_fail_at_config_time(name):
    with pytest.raises(ConfigError, match="output_name"):
        from_dict({"output_name": name})


def _no_model_load(monkeypatch):
    import lora_trainer.models.loader as loader

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the config's paths were checked")

    monkeypatch.setattr(loader, "load_base_model", boom)


def test_bad_paths_are_one_line_errors_before_the_model_loads(tiny_files, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    data = make_images(tmp_path / "dataset", n=2)
    cases = []
    (tmp_path / "a_file").write_text("x")
    cases.append((dict(output_dir=str(tmp_path / "a_file")), "is a file"))
    cases.append((dict(train_data_dir=str(tmp_path / "datset")), "did you mean"))
    cases.append((dict(train_data_dir=None), "train_data_dir is required"))
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(Path(tiny_files["sd1"]).read_bytes()[:100_000])
    cases.append((dict(base_model=str(truncated)), "not a complete .safetensors"))
    garbage = tmp_path / "init.safetensors"
    garbage.write_bytes(os.urandom(4096))
    cases.append((dict(init_lora_weights=str(garbage)), "init_lora_weights"))
    cases.append((dict(vae=str(tmp_path / "missing_vae.safetensors")), "vae"))
    for extra, expected in cases:
        cfg = base_config(**{**dict(base_model=str(tiny_files["sd1"]), train_data_dir=str(data),
                                    output_dir=str(tmp_path / "o"), output_name="p"), **extra})
        with pytest.raises(ConfigError) as info:
            Trainer(cfg).run()
        assert expected in str(info.value) and "\n" not in str(info.value), (extra, str(info.value))


def test_a_garbage_init_lora_of_the_right_type_fails_before_latent_caching(tiny_files, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"lora_unet_nonsense.lora_down.weight": torch.zeros(4, 3)}, str(bad))
    events = EventBus()
    with pytest.raises(ConfigError):
        Trainer(_cfg(tiny_files, tmp_path, init_lora_weights=str(bad)), events).run()
    assert not [e for e in events.since(0)[0] if e.message.startswith("latents")]


def test_non_standard_checkpoint_without_its_yaml_is_one_line(tiny_files, tmp_path):
    from lora_trainer.models.loader import ModelLoadError, load_base_model

    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(tiny_files["sd1"], lonely)  # the tiny model is non-standard; its .yaml stays behind
    with pytest.raises(ModelLoadError) as info:
        load_base_model(str(lonely), log_fn=lambda *_: None)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600 and "lonely.yaml" in msg


def test_resume_with_a_changed_rank_is_named_before_anything_loads(tiny_files, tmp_path, monkeypatch):
    first = _stopped_at(_cfg(tiny_files, tmp_path), 1)
    _no_model_load(monkeypatch)
    cfg = _cfg(tiny_files, tmp_path, lora_rank=8, resume_from_checkpoint=str(first.checkpoint))
    with pytest.raises(ConfigError, match="lora_rank 4 -> 8"):
        Trainer(cfg).run()


@pytest.mark.parametrize("text,line", [
    ('file_name,caption\nimg_00.png,"an open quote\nimg_01.png,fine\nimg_02.png,also\n', 2),
    ('file_name,caption,extra\nimg_00.png,a,b\nimg_01.png\n', 3),
])
def test_broken_metadata_csv_names_the_line_and_check_is_not_ok(tmp_path, text, line, capsys):
    from lora_trainer.cli import main

    data = make_images(tmp_path / "data", n=3)
    (data / "metadata.csv").write_text(text)
    code = main(["check", "--train_data_dir", str(data)])
    out = capsys.readouterr()
    report = out.out + out.err
    assert f"line {line}" in report and "OK: the dataset is usable" not in report
    assert code != 0


def test_messages_never_echo_a_non_dataset_file(tmp_path):
    from lora_trainer.data.report import build_report

    data = make_images(tmp_path / "data", n=2)
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    text = build_report(base_config(train_data_dir=str(data), metadata_path=str(passwd))).format()
    assert "line 1" in text and "root:x" not in text and "daemon" not in text, text
    secrets = tmp_path / "secrets.csv"
    secrets.write_text("user,password\nalice,hunter2-password\nbob.png,token-123\n")
    text = build_report(base_config(train_data_dir=str(data), metadata_path=str(secrets))).format()
    for leak in ("hunter2", "token-123", "alice"):
        assert leak not in text, text
    assert "line 2" in text and "'bob.png' not found" in text  # a name that looks like an image may be quoted


# ---- the HTTP API ------------------------------------------------------------------------------------------
@pytest.fixture
def api(tiny_files, tmp_path, serve_app):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI

    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.api import register_api
    from lora_trainer.ui.jobs import JobRunner

    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs",
                          log=lambda *_: None, api_auth="alice:s3cret")
    app = FastAPI()
    runner = JobRunner()
    register_api(app, lambda: host, runner, dependencies=host.api_access(app))
    return serve_app(app), runner, make_images(tmp_path / "data", n=2)


def test_api_refuses_what_a_request_should_not_do(api, tmp_path, tiny_files):
    client, runner, data = api
    auth = ("alice", "s3cret")
    assert client.get("/lora-trainer/v1/status")[0] == 401
    assert client.post("/lora-trainer/v1/stop")[0] == 401
    assert client.post("/lora-trainer/v1/train", {"config": {}}, auth=("alice", "nope"))[0] == 401
    base = {"train_data_dir": str(data), "output_name": "x", "max_train_steps": 1}
    outside = tmp_path / "elsewhere"
    other_model = tmp_path / "other.safetensors"
    shutil.copy(tiny_files["sd1"], other_model)
    refused = [
        ({"output_dir": str(outside)}, 403), ({"logging_dir": str(outside)}, 403), ({"cache_dir": "/tmp"}, 403),
        ({"base_model": str(other_model)}, 403), ({"vae": str(other_model)}, 403),
        ({"init_lora_weights": str(other_model)}, 403), ({"resume_from_checkpoint": str(outside)}, 403),
        ({"sample_prompts": "/etc/hostname"}, 403), ({"output_name": ".."}, 400),
        ({"output_name": "../../escape"}, 400), ({"output_name": "a\u0000b"}, 400),
    ]
    for extra, code in refused:
        got, body = client.post("/lora-trainer/v1/train", {"config": {**base, **extra}}, auth=auth)
        assert got == code, (extra, got, body)
    assert not outside.exists() and runner.job is None  # nothing started, nothing written
    got, body = client.post("/lora-trainer/v1/train", {"config": base, "resume": "no"}, auth=auth)
    assert got == 400 and "boolean" in body["error"]
    got, body = client.post("/lora-trainer/v1/train", raw=b'{"config": {"x": "' + b"a" * (1 << 20) + b'"}}',
                            auth=auth)
    assert got == 413
    got, body = client.post("/lora-trainer/v1/train", raw=b"{not json", auth=auth)
    assert got == 400


def test_api_never_echoes_a_file_it_was_pointed_at(api, tmp_path):
    client, runner, data = api
    auth = ("alice", "s3cret")
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    got, body = client.post("/lora-trainer/v1/train", {"config": {"train_data_dir": str(data), "output_name": "y",
                                                                  "metadata_path": str(secret),
                                                                  "max_train_steps": 1}}, auth=auth)
    if got == 200:
        assert runner.wait(300)
    everything = json.dumps(body) + json.dumps(client.get("/lora-trainer/v1/status", auth=auth)[1]) + \
        json.dumps(client.get("/lora-trainer/v1/events?since=0", auth=auth)[1])
    assert "root:x" not in everything and "daemon" not in everything and "nologin" not in everything


def test_standalone_server_binds_loopback_and_requires_credentials_elsewhere(tiny_files, tmp_path):
    pytest.importorskip("gradio")
    from lora_trainer.ui.standalone import check_listen

    with pytest.raises(SystemExit, match="--api-auth"):
        check_listen("0.0.0.0", None)
    with pytest.raises(SystemExit, match="user:password"):
        check_listen("0.0.0.0", "no-colon")
    check_listen("127.0.0.1", None)
    check_listen("0.0.0.0", "u:p")


def test_standalone_server_on_another_address_guards_page_and_api(tiny_files, tmp_path):
    """`ui --listen ADDR --api-auth u:p` (ADDR outside 127.0.0.1): the API answers 401 without the credentials,
    and the page does not hand the tab to an anonymous visitor; without --api-auth the server refuses to start."""
    pytest.importorskip("gradio")
    import socket
    import urllib.error
    import urllib.request

    from conftest import Served

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               GRADIO_ANALYTICS_ENABLED="False")
    base_cmd = [sys.executable, "-m", "lora_trainer", "ui", "--base_model", str(tiny_files["sd1"]), "--lora_dir",
                str(tmp_path / "Lora"), "--listen", "127.0.0.2"]
    refused = subprocess.run(base_cmd + ["--port", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--api-auth" in refused.stdout + refused.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(base_cmd + ["--port", str(port), "--api-auth", "alice:s3cret"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Served(f"http://127.0.0.2:{port}")
    try:
        deadline = time.time() + 180
        while True:
            try:
                code, _ = client.get("/lora-trainer/v1/status")
                # Gradio answers (404) a moment before the API's routes join its app: ready once they answer
                if code != 404:
                    break
                assert time.time() < deadline, "the API's routes never joined the server"
                time.sleep(0.2)
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert code == 401
        assert client.get("/lora-trainer/v1/status", auth=("alice", "s3cret")) == (200, {"id": None, "state": "idle"})
        try:
            with urllib.request.urlopen(f"http://127.0.0.2:{port}/config", timeout=30) as r:
                anonymous = r.read().decode()
        except urllib.error.HTTPError as e:  # Gradio 4 answers 401
            anonymous = e.read().decode()
        assert "lora_trainer_start" not in anonymous  # the tab's components are not served without logging in
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
