"""The training API (headless training through the WebUI's or the standalone server's FastAPI app)."""
import json
import time

import pytest

from lora_trainer.config import ConfigError
from lora_trainer.hosts.standalone import StandaloneHost
from lora_trainer.ui.api import PREFIX, parse_request
from lora_trainer.ui.jobs import TERMINAL, JobRunner

from conftest import make_images


def test_parse_request():
    assert parse_request({"config": {"lora_rank": 4}, "resume": True}) == ({"lora_rank": 4}, True, True)
    with pytest.raises(ConfigError, match="JSON boolean"):
        parse_request({"config": {}, "resume": "no"})  # a string is not read as true
    with pytest.raises(ConfigError, match="JSON boolean"):
        parse_request({"config": {}, "preview": 0})
    assert parse_request({"lora_rank": 4, "preview": False}) == ({"lora_rank": 4}, False, False)
    with pytest.raises(ConfigError, match="JSON object"):
        parse_request([1, 2])
    with pytest.raises(ConfigError, match="inside \"config\""):
        parse_request({"config": {}, "lora_rank": 4})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_request({"config": "lora_rank: 4"})


def test_api_routes_start_poll_and_stop(tiny_files, tmp_path, serve_app):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from fastapi import FastAPI

    from lora_trainer.ui.api import register_api

    data = make_images(tmp_path / "data", n=4)
    host = StandaloneHost(str(tiny_files["sd1"]), tmp_path / "Lora", work_dir=tmp_path / "runs", log=lambda *_: None)
    runner = JobRunner()
    app = FastAPI()
    register_api(app, lambda: host, runner)
    client = serve_app(app)
    status = lambda: client.get(PREFIX + "/status")[1]  # noqa: E731
    assert status() == {"id": None, "state": "idle"}
    assert client.post(PREFIX + "/stop") == (200, {"stopping": False})
    code, bad = client.post(PREFIX + "/train", {"config": {"lora_rnk": 4}})
    assert code == 400 and "did you mean 'lora_rank'" in bad["error"]
    config = {"train_data_dir": str(data), "output_name": "api_style",
              "resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32,
              "batch_size": 2, "lora_rank": 4, "max_train_steps": 3, "log_with": "none", "sample_steps": 2}
    started = client.post(PREFIX + "/train", {"config": config, "preview": False})[1]
    assert started["name"] == "api_style" and started["state"] in ("waiting", "running")
    # the API's runs go where the tab's go: the host's run folder
    assert started["run_dir"] == str((tmp_path / "runs" / "api_style").resolve())
    code, busy = client.post(PREFIX + "/train", {"config": config})
    assert code == 409 and "already running" in busy["error"]
    index, seen, deadline = 0, [], time.time() + 300
    while status()["state"] not in TERMINAL and time.time() < deadline:
        page = client.get(PREFIX + f"/events?since={index}")[1]
        seen += page["events"]
        index = page["next"]
        time.sleep(0.1)
    seen += client.get(PREFIX + f"/events?since={index}")[1]["events"]
    st = status()
    assert st["state"] == "finished" and st["step"] == 3 and st["lora_path"].endswith("api_style.safetensors")
    assert [e["step"] for e in seen if e["kind"] == "step"] == [1, 2, 3]
    json.dumps(st), json.dumps(seen)  # everything is JSON-serialisable


def test_cli_ui_serves_the_tab_and_trains_over_http(tiny_files, tmp_path):
    """`python -m lora_trainer ui` end to end over real HTTP: the page, a JSON training request, status and
    events polling, then Ctrl-C ends the server cleanly."""
    pytest.importorskip("gradio")
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = make_images(tmp_path / "data", n=4)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--base_model", str(tiny_files["sd1"]),
                             "--lora_dir", str(tmp_path / "Lora"), "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def get(path):
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.read().decode()

    def post(path, body):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.time() + 180
        while True:
            try:
                assert json.loads(get(PREFIX + "/status")) == {"id": None, "state": "idle"}
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert "lora_trainer_start" in get("/") or "Train LoRA" in get("/")
        code, body = post(PREFIX + "/train", {"config": {"lora_rank": "four"}})
        assert code == 400 and "lora_rank" in body["error"]
        config = {"train_data_dir": str(data), "output_name": "http_style", "resolution": 64, "min_bucket_reso": 64,
                  "max_bucket_reso": 128, "bucket_reso_steps": 32, "batch_size": 2, "lora_rank": 4,
                  "max_train_steps": 2, "log_with": "none", "sample_steps": 2}
        code, body = post(PREFIX + "/train", {"config": config})
        assert code == 200 and body["name"] == "http_style", body
        deadline = time.time() + 300
        # "finished" comes as soon as the LoRA is installed; the card's preview follows while the phase says so
        while (st := json.loads(get(PREFIX + "/status")))["state"] not in TERMINAL or st["phase"]:
            assert time.time() < deadline, st
            time.sleep(0.5)
        assert st["state"] == "finished", st
        assert Path(st["lora_path"]) == (tmp_path / "Lora" / "http_style.safetensors").resolve()
        events = json.loads(get(PREFIX + "/events?since=0"))
        assert [e["step"] for e in events["events"] if e["kind"] == "step"] == [1, 2]
        assert any(e["kind"] == "message" and e["message"].startswith("preview saved: ") for e in events["events"])
        assert (tmp_path / "Lora" / "http_style.png").is_file()
        assert json.loads(get(PREFIX + f"/events?since={events['next']}"))["events"] == []
    finally:
        proc.send_signal(signal.SIGINT)
        asked = time.time()
        try:  # the server bounds its own close (30 s, then its threads' stacks and exit)
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, f"{out}\n(killed {time.time() - asked:.0f} s after Ctrl-C)"
    assert "closing the server ..." in out and "did not close" not in out, out
    assert "Train LoRA: http://" in out


def test_the_servers_shutdown_is_bounded_and_shows_what_hung(capfd):
    """After Ctrl-C the standalone server closes Gradio's server in a bounded time: one that never closes gets
    its threads' stacks printed (the console says what hung) and the process ends anyway."""
    import threading

    from lora_trainer.ui.standalone import shut_down

    release = threading.Event()

    class NeverCloses:
        def close(self):
            release.wait(60)

    started = time.time()
    try:
        shut_down(NeverCloses(), close_timeout_s=1)
    finally:
        release.set()
    assert time.time() - started < 15
    out, err = capfd.readouterr()
    assert "closing the server ..." in out and "did not close within 1 s; exiting anyway" in out
    assert "in close" in err  # faulthandler's stack of the stuck thread
