"""Which host are we running in: Forge, AUTOMATIC1111, or none (standalone)."""
from __future__ import annotations

import importlib.util
import sys


def _has_module(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-imported
        return False


def detect_host_kind() -> str:
    """'forge', 'a1111' or 'standalone'.

    Forge is A1111's code base plus its own `backend` package, so it is recognised first, by
    `backend.memory_management`; A1111 by its `modules.shared` / `modules.script_callbacks`."""
    if _has_module("backend") and _has_module("backend.memory_management") and _has_module("modules.shared"):
        return "forge"
    if _has_module("modules.script_callbacks") and _has_module("modules.shared"):
        return "a1111"
    return "standalone"


def host_for_webui(log=print):
    """The host adapter of the WebUI we were loaded into (for scripts/lora_trainer_tab.py)."""
    kind = detect_host_kind()
    if kind == "a1111":
        from .a1111 import A1111Host

        return A1111Host(log=log)
    if kind == "forge":
        from .forge import ForgeHost

        return ForgeHost(log=log)
    raise RuntimeError("not running inside a WebUI; use `python -m lora_trainer ui --base_model PATH`")
