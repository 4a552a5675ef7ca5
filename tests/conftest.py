"""Shared fixtures: tiny real models (built in code, offline) and small generated datasets."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    if "LORA_TRAINER_CACHE" not in os.environ:
        os.environ["LORA_TRAINER_CACHE"] = str(tmp_path_factory.mktemp("lt-cache"))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Original-format single files (+ .yaml) for SD1, SD2 (v-prediction) and SDXL."""
    from lora_trainer.models.tiny import write_tiny_single_file

    root = tmp_path_factory.mktemp("models")
    return {
        "sd1": write_tiny_single_file(root / "tiny-sd1.safetensors", "sd1"),
        "sd2": write_tiny_single_file(root / "tiny-sd2-v.safetensors", "sd2", v_prediction=True),
        "sdxl": write_tiny_single_file(root / "tiny-sdxl.safetensors", "sdxl"),
    }


@pytest.fixture(scope="session")
def tiny_folders(tiny_files, tmp_path_factory):
    """The same models as diffusers folders."""
    from lora_trainer.models.loader import load_single_file
    from lora_trainer.models.tiny import write_diffusers_folder

    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for family, path in tiny_files.items():
        model = load_single_file(path, log_fn=lambda *_: None)
        out[family] = write_diffusers_folder(model, root / path.stem)
    return out


def make_images(folder: Path, n: int = 6, seed: int = 0, sizes=((64, 64), (96, 64), (64, 96))) -> Path:
    """Small coloured images with sidecar captions."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue"]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        colour = colours[i % 3]
        img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        d = ImageDraw.Draw(img)
        d.rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill={"red": (220, 20, 20), "green": (20, 200, 20),
                                                                    "blue": (20, 20, 220)}[colour])
        img.save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"{colour} square, simple background, sample {i}")
    return folder


@pytest.fixture
def image_dir(tmp_path):
    return make_images(tmp_path / "data")


def base_config(**overrides):
    from lora_trainer.config import from_dict

    cfg = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 32,
           "batch_size": 2, "lora_rank": 4, "learning_rate": 1e-3, "log_with": "none", "seed": 3}
    cfg.update(overrides)
    return from_dict(cfg)


# ---- HTTP: a FastAPI app served for real on a loopback port (TestClient's httpx pin differs per environment)
class Served:
    def __init__(self, base: str):
        self.base = base

    def request(self, method: str, path: str, body=None, raw: bytes = None, auth=None, headers=None):
        """(status, parsed JSON or text) of one request; body is sent as JSON, raw as given."""
        import base64
        import json
        import urllib.error
        import urllib.request

        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if auth:
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)


@pytest.fixture
def serve_app():
    """serve_app(app) -> Served; the servers stop at the end of the test."""
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")  # comes with the WebUIs' gradio/fastapi environments
    servers = []

    def start(app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the test server did not start"
            time.sleep(0.05)
        servers.append((server, thread))
        return Served(f"http://127.0.0.1:{port}")

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def assert_stop_then_resume_is_exact(config, stop_at: int, total: int, out_a: Path, out_b: Path):
    """Runs config(out) straight through, and again stopped after step `stop_at` then resumed from its checkpoint;
    both must end on the same LoRA and the same losses. Returns the straight run's result."""
    from lora_trainer.network.kohya_file import read_lora
    from lora_trainer.train.control import StopFlag
    from lora_trainer.train.events import EventBus
    from lora_trainer.train.trainer import Trainer

    straight = Trainer(config(out_a)).run()
    assert straight.status == "finished" and straight.global_step == total

    events, stop = EventBus(), StopFlag()
    events.subscribe(lambda e: stop.set("test") if e.kind == "step" and e.step == stop_at else None)
    first = Trainer(config(out_b), events, stop).run()
    assert first.status == "stopped" and first.global_step == stop_at
    assert first.checkpoint.name == f"checkpoint-{stop_at}" and first.lora_path is None
    assert not list(out_b.glob("*.safetensors"))  # a stopped run leaves no final LoRA

    resumed = Trainer(config(out_b, resume_from_checkpoint=str(first.checkpoint))).run()
    assert resumed.status == "finished" and resumed.global_step == total
    a, _ = read_lora(straight.lora_path)
    b, _ = read_lora(resumed.lora_path)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert straight.losses[stop_at:] == pytest.approx(resumed.losses, abs=1e-6)
    return straight
