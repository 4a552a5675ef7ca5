"""Text datasets for task_type: text-generation.

Reading (this file knows nothing about tokenizers):
- ``.txt``: one sample per line; or, when a file holds paragraphs of several lines separated by blank
  lines, one sample per paragraph.
- ``.jsonl``: one JSON object per line, either ``{"text": ...}``, ``{"prompt": ..., "completion": ...}``
  or ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

Problems (empty lines, invalid JSON, unknown keys, undecodable files) are collected as `DataIssue`s that
name the file and line; the sample is skipped and training goes on with the rest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..config import ConfigError

TEXT_EXTENSIONS = (".txt", ".jsonl")
ROLES = ("system", "user", "assistant")

FORMATS_HELP = (".txt (one sample per line, or paragraphs separated by blank lines) and .jsonl (one JSON object "
                "per line: {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or {\"messages\": [{\"role\": "
                "\"user\", \"content\": ...}, {\"role\": \"assistant\", \"content\": ...}]})")


@dataclass
class DataIssue:
    file: str
    line: int  # 1-based; 0 when the problem concerns the whole file
    message: str
    skipped: bool = True  # False for a sample that is used all the same (truncated)

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line else self.file
        return f"{where}: {self.message}"


@dataclass
class TextSample:
    """One training example as written in the data file.

    kind: "text" (trained on every token), "completion" (prompt masked) or "chat" (only assistant turns trained).
    """
    kind: str
    file: str
    line: int
    text: Optional[str] = None
    prompt: Optional[str] = None
    completion: Optional[str] = None
    messages: list = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"

    def as_messages(self) -> list[dict]:
        if self.kind == "chat":
            return self.messages
        if self.kind == "completion":
            return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]
        raise ValueError("plain text samples have no messages")


def find_data_files(root: Union[str, Path]) -> tuple[list[Path], list[Path]]:
    """(data files sorted by path, other files that were ignored). root may be a folder or one file."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in TEXT_EXTENSIONS:
            raise ConfigError(f"train_data_dir: {root} is neither a folder nor a .txt/.jsonl file; accepted: "
                              f"{FORMATS_HELP}")
        return [root], []
    if not root.is_dir():
        raise ConfigError(f"train_data_dir: {root} does not exist (expected a folder of {FORMATS_HELP})")
    found, ignored = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        (found if p.suffix.lower() in TEXT_EXTENSIONS else ignored).append(p)
    return found, ignored


def read_text_samples(root: Union[str, Path]) -> tuple[list[TextSample], list[DataIssue], list[Path]]:
    """Reads every .txt/.jsonl file under root. Returns (samples, issues, ignored files)."""
    files, ignored = find_data_files(root)
    samples: list[TextSample] = []
    issues: list[DataIssue] = []
    for path in files:
        try:
            content = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            issues.append(DataIssue(str(path), 0, f"not UTF-8 text ({e.reason} at byte {e.start}); file skipped"))
            continue
        except OSError as e:
            issues.append(DataIssue(str(path), 0, f"cannot be read ({e}); file skipped"))
            continue
        if path.suffix.lower() == ".jsonl":
            _read_jsonl(str(path), content, samples, issues)
        else:
            _read_txt(str(path), content, samples, issues)
    return samples, issues, ignored


def _lines(content: str) -> list[str]:
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another one
    return [ln.rstrip("\r") for ln in lines]


def _read_txt(name: str, content: str, samples: list, issues: list) -> None:
    lines = _lines(content)
    # Paragraph mode when some blank-line separated block spans several lines.
    blocks: list[list[tuple[int, str]]] = [[]]
    for i, ln in enumerate(lines, 1):
        if ln.strip():
            blocks[-1].append((i, ln))
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    if any(len(b) > 1 for b in blocks) and any(not ln.strip() for ln in lines):
        for b in blocks:
            samples.append(TextSample("text", name, b[0][0], text="\n".join(ln for _, ln in b).strip()))
        return
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            issues.append(DataIssue(name, i, "empty line; skipped"))
            continue
        samples.append(TextSample("text", name, i, text=ln.strip()))


def _read_jsonl(name: str, content: str, samples: list, issues: list) -> None:
    for i, ln in enumerate(_lines(content), 1):
        if not ln.strip():
            issues.append(DataIssue(name, i, "empty line; skipped"))
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            issues.append(DataIssue(name, i, f"invalid JSON ({e.msg} at column {e.colno}); skipped"))
            continue
        sample, problem = parse_record(obj, name, i)
        if problem:
            issues.append(DataIssue(name, i, problem + "; skipped"))
        else:
            samples.append(sample)


def parse_record(obj, file: str = "<record>", line: int = 0) -> tuple[Optional[TextSample], Optional[str]]:
    """A JSON object -> (sample, None) or (None, what is wrong with it)."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "\"messages\" must be a non-empty list of {\"role\", \"content\"} objects"
        clean = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return None, f"message {j + 1} must be an object with string \"role\" and \"content\""
            if m["role"] not in ROLES:
                return None, f"message {j + 1} has role {m['role']!r}; use one of {', '.join(ROLES)}"
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
            return None, "no assistant message with content: nothing to learn"
        return TextSample("chat", file, line, messages=clean), None
    if "prompt" in obj or "completion" in obj:
        p, c = obj.get("prompt"), obj.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            return None, "\"prompt\" and \"completion\" must both be strings"
        if not c.strip():
            return None, "empty \"completion\": nothing to learn"
        return TextSample("completion", file, line, prompt=p, completion=c), None
    if "text" in obj:
        t = obj["text"]
        if not isinstance(t, str):
            return None, "\"text\" must be a string"
        if not t.strip():
            return None, "empty \"text\""
        return TextSample("text", file, line, text=t), None
    keys = ", ".join(map(str, list(obj)[:8])) or "none"
    return None, (f"no \"text\", \"prompt\"+\"completion\" or \"messages\" key (found keys: {keys})")
