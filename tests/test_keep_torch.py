"""Installing never swaps a person's torch: the README's install commands hold torch (and torchvision) at the
installed builds through `keep-torch.txt`, and the caption error gives the same command as the README."""
from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lora_trainer import keep_torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_constraints_name_the_installed_builds(capsys):
    lines = keep_torch.constraint_lines()
    assert lines[0] == f"torch=={metadata.version('torch')}"  # local labels such as +cpu kept
    assert all(re.fullmatch(r"torch(vision|audio)?==\S+", line) for line in lines)
    assert keep_torch.main([]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_without_torch_it_says_to_install_it_first(monkeypatch, capsys):
    monkeypatch.setattr(keep_torch, "installed", lambda name: None)
    assert keep_torch.main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "torch is not installed" in captured.err and "https://pytorch.org" in captured.err


def test_torchvision_missing_is_a_note_for_autotag(monkeypatch, capsys):
    monkeypatch.setattr(keep_torch, "installed", lambda name: "2.13.0+cpu" if name == "torch" else None)
    assert keep_torch.main([]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "torch==2.13.0+cpu" and "torchvision is not installed" in captured.err


def test_runs_from_a_checkout_before_the_package_is_installed(tmp_path):
    """`python -m lora_trainer.keep_torch` in the repository folder needs nothing but the standard library."""
    code = ("import sys, runpy; sys.modules['lora_trainer.config'] = None; "
            "runpy.run_module('lora_trainer.keep_torch', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch==")


def _commands(text: str) -> list[str]:
    """Every `pip install ...` in the README, each up to the end of its `&&` segment."""
    return [m.strip() for m in re.findall(r"pip install[^`&\n]*", text)]


def test_every_readme_install_keeps_torch():
    installs = _commands(README)
    assert installs
    for cmd in installs:
        ours = re.search(r"-e \"?\.", cmd) or re.search(r"(?<!--no-deps )open_clip_torch\b", cmd)
        if ours:
            assert "-c keep-torch.txt" in cmd, cmd
    # the constraints file is made before it is used, in each command line that installs the package
    for line in README.splitlines():
        if "-c keep-torch.txt -e ." in line and "gradio" not in line:
            assert line.index(keep_torch.MAKE_CONSTRAINTS) < line.index("-c keep-torch.txt"), line
    assert "CPU-only box `pip install torch`" not in README
    assert "https://pytorch.org" in README


def test_readme_quick_start_is_still_two_commands():
    quick = README[README.index("## Quick start"):README.index("## Training a real LoRA")]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 1  # after installing torch: one line
    assert blocks[0].strip().endswith("python -m lora_trainer demo")


def test_caption_error_and_readme_give_the_same_command(monkeypatch):
    from lora_trainer.caption.backends import TaggerUnavailable, load_backend

    assert keep_torch.INSTALL_OPEN_CLIP in README
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(TaggerUnavailable) as err:
        load_backend("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert keep_torch.INSTALL_OPEN_CLIP in str(err.value)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_command = re.sub(r"\s*\\\n\s*", " ", ci).replace(" -q", "")
    readme_test = re.search(r"## Tests\n\n```bash\n(.*?)\n```", README, re.S).group(1)
    assert readme_test.replace(" -q", "") in ci_command
