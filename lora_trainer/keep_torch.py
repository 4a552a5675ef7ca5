"""`python -m lora_trainer.keep_torch > keep-torch.txt`: pip constraints that keep the torch you have.

pip upgrades torch whenever a package asks for a newer one: open_clip_torch pulls the newest torchvision, which
pins the newest torch, so `pip install open_clip_torch` would replace a CPU torch 2.13 with a CUDA torch 2.14 and
gigabytes of CUDA libraries. `pip install -c keep-torch.txt ...` holds torch (and torchvision / torchaudio where
installed) at the installed builds, so pip picks versions that fit them instead.

Standard library only, and nothing above it in this package is imported: it runs from a checkout before
`pip install -e .` (`python -m` puts the current folder on the path).
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import Optional

PACKAGES = ("torch", "torchvision", "torchaudio")
CONSTRAINTS_FILE = "keep-torch.txt"
PYTORCH_URL = "https://pytorch.org"
MAKE_CONSTRAINTS = f"python -m lora_trainer.keep_torch > {CONSTRAINTS_FILE}"
# the one line for open_clip (autotag), in the caption error and the README alike
INSTALL_OPEN_CLIP = f"{MAKE_CONSTRAINTS} && pip install -c {CONSTRAINTS_FILE} open_clip_torch"


def installed(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def constraint_lines() -> list[str]:
    """`name==version` for each of torch, torchvision, torchaudio that is installed (local labels such as +cpu
    kept: the build you have is the one that stays)."""
    return [f"{name}=={version}" for name in PACKAGES if (version := installed(name))]


def main(argv: Optional[list[str]] = None) -> int:
    lines = constraint_lines()
    if not any(line.startswith("torch==") for line in lines):
        print(f"torch is not installed in this Python ({sys.executable}). Install the build for your machine first "
              f"(the command {PYTORCH_URL} gives for your OS and GPU, or CPU), then run this again.", file=sys.stderr)
        return 1
    if installed("torchvision") is None:
        print("note: torchvision is not installed; autotag (open_clip) needs one built for your torch: install it "
              f"the way you installed torch ({PYTORCH_URL}) before open_clip_torch", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
