"""install.py (run by the WebUI at start-up) with a fake `launch` module."""
import importlib.metadata
import re
import runpy
import sys
import types
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"


def _run(monkeypatch, installed: dict):
    calls = []

    def is_installed(name):
        return name in installed

    def run_pip(command, desc=None):
        path = re.search(r'-c "([^"]+)"', command).group(1)
        calls.append((command, Path(path).read_text(), desc))

    launch = types.ModuleType("launch")
    launch.is_installed, launch.run_pip = is_installed, run_pip
    monkeypatch.setitem(sys.modules, "launch", launch)
    real_version = importlib.metadata.version

    def version(name):
        if name in ("diffusers", "peft"):
            if name in installed:
                return installed[name]
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    runpy.run_path(str(INSTALL), run_name="__main__")
    return calls


def test_installs_missing_packages_with_the_webui_pins_as_constraints(monkeypatch):
    calls = _run(monkeypatch, {})
    assert len(calls) == 1
    command, constraints, desc = calls[0]
    assert '"diffusers==0.31.0"' in command and '"peft==0.13.2"' in command and command.startswith("install -c ")
    torch_version = importlib.metadata.version("torch")
    assert f"torch=={torch_version}" in constraints.splitlines()  # never moved
    assert f"transformers=={importlib.metadata.version('transformers')}" in constraints.splitlines()
    assert "huggingface-hub" in constraints
    assert not Path(re.search(r'-c "([^"]+)"', command).group(1)).exists()  # the temporary file is removed


def test_installs_nothing_when_present_and_never_upgrades(monkeypatch, capsys):
    assert _run(monkeypatch, {"diffusers": "0.31.0", "peft": "0.13.2"}) == []
    calls = _run(monkeypatch, {"diffusers": "0.25.0", "peft": "0.13.2"})
    assert calls == []  # an older diffusers is reported, not replaced (another extension may need it)
    err = capsys.readouterr().err
    assert "diffusers 0.25.0 is installed" in err and "pip install" in err


@pytest.mark.parametrize("present", [{"diffusers": "0.31.0"}, {"peft": "0.14.0"}])
def test_installs_only_what_is_missing(monkeypatch, present):
    calls = _run(monkeypatch, present)
    assert len(calls) == 1
    for name in ("diffusers", "peft"):
        assert (f'"{name}==' in calls[0][0]) == (name not in present)
