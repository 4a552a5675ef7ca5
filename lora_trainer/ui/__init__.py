"""The Train LoRA tab (Gradio) and the background job runner.

`build_tab(host)` imports Gradio on call, so `lora_trainer.ui.jobs` and the controller work without it."""


def build_tab(host, runner=None):
    from .tab import build_tab as _build_tab

    return _build_tab(host, runner)


__all__ = ["build_tab"]
