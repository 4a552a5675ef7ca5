"""`python -m lora_trainer ui`: the Train LoRA tab outside a WebUI, on the standalone host.

    python -m lora_trainer ui --base_model model.safetensors --lora_dir models/Lora --port 7861

Serves the same tab as the WebUI extension (and the same HTTP API under /lora-trainer/v1/). It listens on
127.0.0.1 only; serving on another address (--listen) needs --api-auth user:pass, which then guards both the
page and the API.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

CSS_FILE = Path(__file__).resolve().parents[2] / "style.css"


def _css() -> Optional[str]:
    try:
        return CSS_FILE.read_text(encoding="utf-8")
    except OSError:
        return None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_listen(listen: str, api_auth) -> None:
    """Anything but loopback is reachable by others: refuse it without credentials."""
    if listen not in LOOPBACK and not api_auth:
        raise SystemExit(f"--listen {listen} makes the server reachable from other machines: add --api-auth "
                         f"user:password (it then guards the page and the API), or keep the default 127.0.0.1")
    if api_auth:
        from .api import parse_credentials

        try:
            parse_credentials(api_auth)
        except ValueError as e:
            raise SystemExit(f"--api-auth: {e}") from None


def launch(host, port: int = 7861, listen: str = "127.0.0.1", runner=None, quiet: bool = False,
           api_auth=None):
    """Builds the tab on `host`, starts the server without blocking; returns (demo, app, url)."""
    check_listen(listen, api_auth)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .api import register_api
    from .jobs import default_runner
    from .tab import build_tab, gradio_major

    runner = runner or default_runner()
    demo = build_tab(host, runner, restore_on_load=True)
    css = _css()
    if css:
        demo.css = (demo.css or "") + css
    demo.title = "Train LoRA"
    if gradio_major() >= 4:
        demo.queue(default_concurrency_limit=8)
    else:
        demo.queue(concurrency_count=8)
    auth = None
    if api_auth:
        from .api import parse_credentials

        auth = list(parse_credentials(api_auth).items())
    app, url, _share = demo.launch(server_name=listen, server_port=int(port), prevent_thread_lock=True,
                                   inbrowser=False, show_error=True, quiet=quiet, auth=auth)
    register_api(app, lambda: host, runner, dependencies=host.api_access(app))
    return demo, app, url


def serve(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("the UI needs Gradio: pip install gradio (3.41 or 4.x), or use the train / caption / check commands")
        return 2
    from ..hosts.standalone import StandaloneHost

    listen, api_auth = getattr(args, "listen", "127.0.0.1"), getattr(args, "api_auth", None)
    check_listen(listen, api_auth)
    host = StandaloneHost(getattr(args, "base_model", None), getattr(args, "lora_dir", "models/Lora"),
                          work_dir=getattr(args, "work_dir", None), models_dir=getattr(args, "models_dir", None),
                          api_auth=api_auth)
    info = host.checkpoint_info()
    print(f"base model: {info.describe()}")
    print(f"LoRA folder: {host.lora_dir()}  runs: {host.work_dir()}")
    demo, _app, url = launch(host, getattr(args, "port", 7861), listen, api_auth=api_auth)
    print(f"Train LoRA: {url}  (API: {url.rstrip('/')}/lora-trainer/v1/status)  Ctrl-C stops the server", flush=True)
    # Ctrl-C stops the server even when it was started with SIGINT ignored (a background job of a script), as the
    # train command's own handler does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:  # our own wait (not Gradio's block_thread): the shutdown below is ours, with bounds
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        shut_down(demo)
    # Everything is saved and the server is closed; a thread that still lingers (Gradio's, a library's) must not
    # keep the process alive after Ctrl-C.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shut_down(demo, close_timeout_s: float = 30.0) -> None:
    """After Ctrl-C: a running job saves a resumable checkpoint (it may take minutes), then the server closes.
    A close that does not end within close_timeout_s prints every thread's stack (the console shows what hung)
    and is left behind."""
    import faulthandler
    import threading

    from .jobs import default_runner

    runner = default_runner()
    if runner.stop("the server is shutting down: saving a resumable checkpoint"):
        print("saving a checkpoint of the running job before exiting ...", flush=True)
    else:  # nothing to save: a wait of a minute means something hangs; the console gets every thread's stack
        faulthandler.dump_traceback_later(60)
    # also a finished job's thread may still render its LoRA card's picture: exiting under it aborts the process
    runner.wait(600)
    faulthandler.cancel_dump_traceback_later()
    print("closing the server ...", flush=True)
    closer = threading.Thread(target=demo.close, name="close-server", daemon=True)
    closer.start()
    closer.join(close_timeout_s)
    if closer.is_alive():
        print(f"the server did not close within {close_timeout_s:.0f} s; exiting anyway. Its threads:", flush=True)
        faulthandler.dump_traceback(all_threads=True)
