"""Hosts: who owns the GPU and the loaded checkpoint (the contract is in base.py, see docs/design.md).

Only this package imports a WebUI's `modules.*` (always lazily)."""
from .base import PREVIEW_SUBDIR, CheckpointInfo, Host, HostBusy, HostError, LoadedCheckpoint, StagedLora
from .detect import detect_host_kind, host_for_webui

__all__ = ["Host", "HostError", "HostBusy", "LoadedCheckpoint", "CheckpointInfo", "StagedLora", "PREVIEW_SUBDIR",
           "detect_host_kind", "host_for_webui"]
