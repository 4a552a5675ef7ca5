"""Run by the WebUI at start-up (AUTOMATIC1111 / Forge): installs only what the WebUI lacks.

lora-trainer needs diffusers and peft, which A1111 v1.10 does not ship (Forge does). A plain
`pip install peft diffusers` there upgrades transformers and pydantic and breaks the WebUI, so this
installs exact versions known to work with the WebUI's pins (diffusers 0.31.0, peft 0.13.2) and passes
every package the WebUI already has as a constraint at its installed version: pip either fits the new
packages around them or fails with a message; it never moves the WebUI's own packages. Packages that are
already installed are never up- or downgraded here; if one is too old, this prints what to do.
"""
import importlib.metadata
import os
import sys
import tempfile

import launch

NEEDED = {"diffusers": "0.31.0", "peft": "0.13.2"}
MINIMUM = {"diffusers": "0.31.0", "peft": "0.13.2"}
# Installed packages that pip must not move while installing ours (the WebUI's pins and what they depend on).
KEEP = ("torch", "torchvision", "torchaudio", "xformers", "transformers", "tokenizers", "accelerate", "safetensors",
        "numpy", "pillow", "gradio", "gradio-client", "fastapi", "starlette", "pydantic", "pydantic-core", "protobuf",
        "psutil", "httpx", "httpcore", "open-clip-torch", "pytorch-lightning", "omegaconf", "einops", "kornia",
        "packaging", "pyyaml", "requests", "tqdm", "regex", "filelock", "setuptools")


def installed_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def older_than(version, minimum):
    try:
        from packaging.version import Version

        return Version(version) < Version(minimum)
    except Exception:  # an unparsable version: leave it alone
        return False


def constraints_text():
    lines = []
    for name in KEEP:
        version = installed_version(name)
        if version:
            lines.append(f"{name}=={version}")
    hub = installed_version("huggingface-hub")
    if hub and not older_than(hub, "1.0"):
        lines.append(f"huggingface-hub=={hub}")
    else:
        lines.append("huggingface-hub<1.0")  # transformers 4.x (the WebUIs' pins) needs hub 0.x
    return "\n".join(lines) + "\n"


def main():
    missing = []
    for name, version in NEEDED.items():
        have = installed_version(name)
        if have is None and not launch.is_installed(name):
            missing.append(f"{name}=={version}")
        elif have is not None and older_than(have, MINIMUM[name]):
            print(f"[lora-trainer] {name} {have} is installed but lora-trainer needs >= {MINIMUM[name]}; it was not "
                  f"changed (another extension may rely on it). To upgrade: pip install \"{name}=={NEEDED[name]}\" "
                  f"in the WebUI's venv.", file=sys.stderr)
    if not missing:
        return
    fd, path = tempfile.mkstemp(prefix="lora-trainer-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(constraints_text())
        launch.run_pip(f'install -c "{path}" ' + " ".join(f'"{m}"' for m in missing),
                       f"lora-trainer requirements: {', '.join(missing)}")
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


main()
