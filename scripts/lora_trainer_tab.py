"""WebUI registration (AUTOMATIC1111): the "Train LoRA" tab and the training API. Everything else lives in
the lora_trainer package; this file only hands the host adapter to it.

API (JSON), served by the WebUI's FastAPI app only when the WebUI serves its API (--api or --nowebui), behind
its --api-auth:
  POST /lora-trainer/v1/train   {"config": {...TrainConfig keys...}, "resume": false, "preview": true}
  GET  /lora-trainer/v1/status
  GET  /lora-trainer/v1/events?since=N
  POST /lora-trainer/v1/stop
"""
from modules import script_callbacks

# Imported while the WebUI loads this file (its extension folder is on sys.path only then); the heavy
# parts (torch models, diffusers, Gradio widgets) are imported later, inside the callbacks.
import lora_trainer.hosts.detect as _detect
import lora_trainer.ui as _ui
import lora_trainer.ui.api as _api

_HOST = None


def _host():
    global _HOST
    if _HOST is None:
        _HOST = _detect.host_for_webui(log=lambda msg: print(f"[lora-trainer] {msg}"))
    return _HOST


def on_ui_tabs():
    try:
        tab = _ui.build_tab(_host())
    except Exception as e:  # never take the WebUI down with us
        print(f"[lora-trainer] the Train LoRA tab is not available: {type(e).__name__}: {e}")
        return []
    return [(tab, "Train LoRA", "lora_trainer")]


def on_app_started(demo, app):
    try:
        host = _host()
        dependencies = host.api_access(app)
        if dependencies is None:
            return  # the WebUI serves no API (no --api): neither do we
        _api.register_api(app, _host, dependencies=dependencies)
    except Exception as e:
        print(f"[lora-trainer] the training API is not available: {type(e).__name__}: {e}")


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(on_app_started)
