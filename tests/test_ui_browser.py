"""The standalone tab in a real browser (Chromium driven by Playwright), end to end:
dataset -> autotag -> caption edit -> train -> LoRA file in the folder -> previews at weight 1 and 0.

Skips only when Playwright or Chromium is missing (CI installs both in the A1111 environment:
`pip install playwright` and `apt-get install -y chromium`; never `playwright install`).

The same tests run against a live WebUI on this machine (its Train LoRA tab, its own model and folders):

    LORA_TRAINER_LIVE_URL=http://127.0.0.1:7860/ LORA_TRAINER_LIVE_LORA_DIR=/path/to/models/Lora \
    LORA_TRAINER_LIVE_WORK_DIR=/path/to/output/lora-trainer python -m pytest tests/test_ui_browser.py

Names get a time suffix there (a live LoRA folder keeps earlier results); checks that need the host in this
process (the base model's own image at weight 0) are left to the standalone run."""
import base64
import re
import io
import os
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("LORA_TRAINER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
    or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

import gradio  # noqa: E402,F401  (with a browser at hand, a missing Gradio is an error, not a skip)

from lora_trainer.hosts.standalone import StandaloneHost  # noqa: E402
from lora_trainer.ui.jobs import JobRunner  # noqa: E402

from conftest import make_images  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
T = 120_000  # ms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LIVE = os.environ.get("LORA_TRAINER_LIVE_URL")
SUFFIX = time.strftime("_%H%M%S") if LIVE else ""  # a live LoRA folder keeps earlier runs' files
STYLE, RELOAD, UPLOADS = "browser_style" + SUFFIX, "reload_me" + SUFFIX, "my uploads" + SUFFIX


class LiveHost:
    """What the tests read of a live WebUI: its folders (given by the environment); it cannot preview here."""
    preview = None

    @staticmethod
    def lora_dir() -> Path:
        return Path(os.environ["LORA_TRAINER_LIVE_LORA_DIR"])

    @staticmethod
    def work_dir() -> Path:
        return Path(os.environ["LORA_TRAINER_LIVE_WORK_DIR"])


@pytest.fixture(scope="module")
def server(tiny_files, tmp_path_factory):
    from lora_trainer.ui.standalone import launch

    root = tmp_path_factory.mktemp("browser")
    if LIVE:
        yield LiveHost(), LIVE, root
        return
    host = StandaloneHost(str(tiny_files["sd1"]), root / "Lora", work_dir=root / "runs", log=lambda *_: None)
    demo, _app, url = launch(host, _free_port(), runner=JobRunner(), quiet=True)
    yield host, url, root
    if getattr(demo, "server", None) is not None:
        demo.server.force_exit = True  # do not wait for the browser's long-lived queue connections
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(T)
        pg.goto(server[1])
        if LIVE:  # a WebUI: the tab is one of many
            pg.locator("button", has_text="Train LoRA").first.click()
        pg.wait_for_selector("#lora_trainer_dataset_dir textarea")
        yield pg
        browser.close()


# ---- small helpers over Gradio 3's DOM ------------------------------------------------------------------
def set_text(page, eid, value):
    box = page.locator(f"#{eid} textarea").first
    box.fill(str(value))
    box.dispatch_event("blur")


def set_number(page, eid, value):
    box = page.locator(f"#{eid} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def text_of(page, eid) -> str:
    return page.locator(f"#{eid} textarea").first.input_value()


def wait_for(page, eid, predicate, what, timeout=300):
    deadline = time.time() + timeout
    value = ""
    while time.time() < deadline:
        value = text_of(page, eid)
        if predicate(value):
            return value
        time.sleep(0.25)
    raise AssertionError(f"#{eid}: {what} did not happen within {timeout}s; it shows: {value!r}")


def image_of(page, base_url, eid, previous_src=None):
    deadline = time.time() + 120
    while time.time() < deadline:
        img = page.locator(f"#{eid} img")
        if img.count():
            src = img.first.get_attribute("src")
            if src and src != previous_src:
                break
        time.sleep(0.25)
    else:
        raise AssertionError(f"#{eid} shows no (new) image")
    if src.startswith("data:"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        data = page.request.get(urljoin(base_url, src)).body()
    from PIL import Image

    return src, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_train_and_preview_in_the_browser(server, page, tmp_path):
    from lora_trainer.caption.testing import save_tiny_clip

    host, url, root = server
    data = make_images(root / "dataset", n=4)
    for name in ("img_01.txt", "img_03.txt"):  # two images without captions for autotag
        (data / name).unlink()
    clip = save_tiny_clip(root / "tiny-clip")

    # -- base model shown --
    info = text_of(page, "lora_trainer_base_info")
    assert "SD1" in info or "loads it on first use" in info, info  # Forge loads its checkpoint lazily

    # -- dataset --
    set_text(page, "lora_trainer_dataset_dir", data)
    page.click("#lora_trainer_dataset_load")
    wait_for(page, "lora_trainer_dataset_msg", lambda v: "4 image(s), 2 with a caption" in v, "loading the dataset")
    assert page.locator("#lora_trainer_gallery img").count() >= 4

    # -- autotag the two uncaptioned images; the one trigger-word field is Parameters' --
    set_text(page, "lora_trainer_tagger_model", f"hf:{clip}")
    set_number(page, "lora_trainer_threshold", 0)
    set_text(page, "lora_trainer_cfg_caption_prefix", "zzbrowser")
    assert page.locator("#lora_trainer_trigger").count() == 0
    page.click("#lora_trainer_autotag")
    msg = wait_for(page, "lora_trainer_caption_msg", lambda v: v.startswith("autotag") or "cannot" in v, "autotag")
    assert "2 written, 2 kept" in msg and "'zzbrowser' (Parameters) is put first" in msg, msg
    for name in ("img_01.txt", "img_03.txt"):
        text = (data / name).read_text()
        assert text.strip() and "zzbrowser" not in text, text
    assert (data / "img_00.txt").read_text().strip() == "red square, simple background, sample 0"  # kept

    # -- edit one caption --
    wait_for(page, "lora_trainer_caption", lambda v: v.startswith("red square"), "the first caption to show")
    set_text(page, "lora_trainer_caption", "zzbrowser, red square edited in the browser")
    page.click("#lora_trainer_caption_save")
    wait_for(page, "lora_trainer_caption_msg", lambda v: v.startswith("saved"), "saving the caption")
    assert (data / "img_00.txt").read_text().strip() == "zzbrowser, red square edited in the browser"

    # -- parameters: tiny and fast --
    set_text(page, "lora_trainer_cfg_output_name", STYLE)
    set_text(page, "lora_trainer_cfg_resolution", "64")
    set_number(page, "lora_trainer_cfg_lora_rank", 4)
    set_text(page, "lora_trainer_cfg_lora_alpha", "4")
    set_text(page, "lora_trainer_cfg_learning_rate", "0.05")
    set_number(page, "lora_trainer_cfg_batch_size", 2)
    set_text(page, "lora_trainer_cfg_max_train_steps", "4")
    page.click("#lora_trainer_advanced .label-wrap")
    set_number(page, "lora_trainer_cfg_min_bucket_reso", 64)
    set_number(page, "lora_trainer_cfg_max_bucket_reso", 128)
    set_number(page, "lora_trainer_cfg_bucket_reso_steps", 32)
    set_number(page, "lora_trainer_cfg_sample_steps", 3)
    set_number(page, "lora_trainer_cfg_save_steps", 2)
    page.click("#lora_trainer_check")
    wait_for(page, "lora_trainer_report", lambda v: "OK: the dataset is usable" in v or "error" in v, "the check")
    assert "4 training image(s)" in text_of(page, "lora_trainer_report")

    # -- train --
    page.click("#lora_trainer_start")
    # a live WebUI's page opens showing its last run: wait for this run's own name
    began = ("started", "waiting", "running", "finished")
    msg = wait_for(page, "lora_trainer_run_msg", lambda v: v.startswith("not started") or
                   (v.startswith(began) and STYLE in v), "starting")
    assert not msg.startswith("not"), msg
    status = wait_for(page, "lora_trainer_status", lambda v: v.startswith(("finished", "failed", "stopped"))
                      and STYLE in v, "training to end")
    assert status.startswith("finished") and "step 4/4 (100%)" in status, status
    lora = host.lora_dir() / f"{STYLE}.safetensors"
    assert lora.is_file() and str(lora) in status
    # finished as soon as the LoRA is installed; the card's picture follows, said beside the progress
    wait_for(page, "lora_trainer_status", lambda v: "rendering the LoRA card's preview" not in v, "the card preview")
    assert lora.with_suffix(".png").is_file() and lora.with_suffix(".json").is_file()
    assert "installed" in text_of(page, "lora_trainer_log")
    assert page.locator("#lora_trainer_loss img").count() == 1  # the loss curve is drawn
    assert page.locator("#lora_trainer_lora_pick input").first.input_value() == STYLE

    # -- preview: weight 1 differs from weight 0, weight 0 is the base model --
    page.click("#lora_trainer_prompt_fill")
    prompt = wait_for(page, "lora_trainer_prompt", lambda v: v.startswith("zzbrowser"), "the prompt to fill")
    set_number(page, "lora_trainer_steps", 3)
    set_text(page, "lora_trainer_size", "64")
    page.click("#lora_trainer_generate")
    wait_for(page, "lora_trainer_preview_msg", lambda v: f"<lora:{STYLE}:1>" in v, "the weight-1 preview")
    src1, at_one = image_of(page, url, "lora_trainer_preview_img")
    set_number(page, "lora_trainer_weight", 0)
    assert page.locator("#lora_trainer_weight input[type=range]").input_value() == "0"
    page.click("#lora_trainer_generate")
    wait_for(page, "lora_trainer_preview_msg", lambda v: f"<lora:{STYLE}:0>" in v, "the weight-0 preview")
    _src0, at_zero = image_of(page, url, "lora_trainer_preview_img", previous_src=src1)
    if host.preview is not None:
        base = np.asarray(host.preview(prompt, None, 0.0, 1234, 3, (64, 64)).convert("RGB"))
        assert at_zero.shape == base.shape == (64, 64, 3)
        assert np.array_equal(at_zero, base)  # weight 0 is exactly the base model
    assert np.abs(at_one.astype(int) - at_zero.astype(int)).mean() > 0.5  # the LoRA changes the picture

    # -- an intermediate checkpoint previews under its own unique name --
    page.click("#lora_trainer_lora_refresh")
    page.click("#lora_trainer_ckpt_pick input")
    page.locator("#lora_trainer_ckpt_pick li", has_text="step 2").first.click()
    set_number(page, "lora_trainer_weight", 1)
    page.click("#lora_trainer_generate")
    msg = wait_for(page, "lora_trainer_preview_msg", lambda v: "step00000" in v or "gone" in v,
                   "the checkpoint preview")
    assert f"<lora:{STYLE}-step000002-" in msg, msg
    assert not (host.lora_dir() / "lora-trainer-previews").exists()  # the preview copy is gone after use


def test_a_reloaded_page_shows_the_run_and_resume_is_one_click(server, page, tmp_path, monkeypatch):
    """Stop a run, reload the page: the run is there as it is (state, settings, loss curve); the form is changed
    on purpose, and Resume still continues the run with its own saved settings."""
    host, url, root = server
    from lora_trainer.train.events import EventBus

    emit = EventBus.emit

    def slow_steps(self, kind, **kw):  # a tiny model trains 40 steps faster than the page polls: give Stop a window
        if kind == "step":
            time.sleep(0.25)
        return emit(self, kind, **kw)

    monkeypatch.setattr(EventBus, "emit", slow_steps)
    data = make_images(root / "reload_data", n=4)
    set_text(page, "lora_trainer_dataset_dir", data)
    set_text(page, "lora_trainer_cfg_output_name", RELOAD)
    set_text(page, "lora_trainer_cfg_resolution", "64")
    set_number(page, "lora_trainer_cfg_lora_rank", 4)
    set_number(page, "lora_trainer_cfg_batch_size", 1)
    set_text(page, "lora_trainer_cfg_max_train_steps", "40")
    if not page.locator("#lora_trainer_cfg_save_steps input[type=number]").first.is_visible():
        page.click("#lora_trainer_advanced .label-wrap")
    set_number(page, "lora_trainer_cfg_min_bucket_reso", 64)
    set_number(page, "lora_trainer_cfg_max_bucket_reso", 128)
    set_number(page, "lora_trainer_cfg_bucket_reso_steps", 32)
    set_number(page, "lora_trainer_cfg_save_steps", 2)
    page.click("#lora_trainer_start")
    def early_step(v):
        m = re.search(r"step (\d+)/40", v)
        return v.startswith("running") and RELOAD in v and m is not None and 2 <= int(m.group(1)) <= 30

    msg = wait_for(page, "lora_trainer_run_msg", lambda v: v.startswith("not started") or RELOAD in v, "starting")
    assert not msg.startswith("not"), msg
    wait_for(page, "lora_trainer_status", early_step, "two steps")
    page.click("#lora_trainer_stop")
    stopped = wait_for(page, "lora_trainer_status", lambda v: v.startswith(("stopped", "failed", "finished"))
                       and RELOAD in v, "the stop")
    assert stopped.startswith("stopped"), stopped

    page.reload()
    if LIVE:
        page.locator("button", has_text="Train LoRA").first.click()
    page.wait_for_selector("#lora_trainer_dataset_dir textarea")
    run = wait_for(page, "lora_trainer_run_msg", lambda v: RELOAD in v, "the run to show after the reload",
                   timeout=60)
    assert run.startswith("stopped") and "Resume" in run, run
    assert text_of(page, "lora_trainer_status").startswith(f"stopped: {RELOAD}")
    assert page.locator("#lora_trainer_cfg_output_name textarea").first.input_value() == RELOAD
    assert text_of(page, "lora_trainer_dataset_dir") == str(data)
    assert page.locator("#lora_trainer_loss img").count() == 1
    assert RELOAD in page.locator("#lora_trainer_runs_pick input").first.input_value()

    set_number(page, "lora_trainer_cfg_lora_rank", 8)  # a changed form does not break the resume
    set_text(page, "lora_trainer_cfg_max_train_steps", "6")
    page.click("#lora_trainer_resume")
    done = wait_for(page, "lora_trainer_status", lambda v: v.startswith(("finished", "failed")) and RELOAD in v,
                    "the resumed run to end")
    assert done.startswith("finished") and "step 40/40" in done, done  # the run's own 40 steps, not the form's 6
    assert "resumed from" in text_of(page, "lora_trainer_log")
    assert page.locator("#lora_trainer_cfg_lora_rank input[type=number]").first.input_value() == "4"


def test_upload_images_into_a_managed_dataset(server, page, tmp_path):
    host, _url, _root = server
    src = make_images(tmp_path / "src", n=2)
    page.click("#lora_trainer_upload_acc .label-wrap")
    page.locator("#lora_trainer_upload input[type=file]").set_input_files(
        [str(src / "img_00.png"), str(src / "img_00.txt"), str(src / "img_01.png")])
    page.wait_for_function("() => document.querySelector('#lora_trainer_upload').innerText.includes('img_01')")
    set_text(page, "lora_trainer_upload_name", UPLOADS)
    page.click("#lora_trainer_upload_btn")
    msg = wait_for(page, "lora_trainer_dataset_msg", lambda v: "copied" in v or "choose" in v, "the upload copy")
    if "arrived empty" in msg:
        # Gradio 3.41 sometimes hands a file over before its upload has ended; the tab says to choose it again,
        # and that is what a person does
        page.locator("#lora_trainer_upload input[type=file]").set_input_files(
            [str(src / "img_00.png"), str(src / "img_00.txt"), str(src / "img_01.png")])
        page.wait_for_timeout(1000)
        page.click("#lora_trainer_upload_btn")
        msg = wait_for(page, "lora_trainer_dataset_msg", lambda v: "copied 2" in v, "the upload chosen again")
    folder = host.work_dir() / "datasets" / UPLOADS.replace(" ", "_")
    assert f"copied 2 image(s) into {folder}" in msg, msg
    assert sorted(p.name for p in folder.iterdir()) == ["img_00.png", "img_00.txt", "img_01.png"]
    assert (folder / "img_00.txt").read_text() == (src / "img_00.txt").read_text()
    assert text_of(page, "lora_trainer_dataset_dir") == str(folder)
    assert "2 image(s), 1 with a caption" in msg
