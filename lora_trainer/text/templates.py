"""Prompt templates and tokenization with a loss mask.

A sample is rendered to one string plus the character ranges that are trained (the answer parts); the
string is tokenized once and every token that overlaps a trained range keeps its id as label, every other
token gets -100. With a fast tokenizer the character offsets of the tokens decide; a slow tokenizer
tokenizes the pieces between range boundaries one by one.

Templates (prompt_template):
- none: plain text ``<bos>text<eos>``; prompt/completion samples are ``<bos>prompt completion<eos>``
  (the two strings are joined as they are); chat samples need one of the templates below.
- llama2-inst: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s><s>[INST] ...`` (Llama-2-chat).
- chatml: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn.
- chat-template: the tokenizer's own ``chat_template`` (jinja), as ``apply_chat_template`` renders it.
Plain text samples are never wrapped in a template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .data import TextSample

IGNORE_INDEX = -100
TEMPLATES = ("none", "llama2-inst", "chatml", "chat-template")


class SampleError(ValueError):
    """A sample that cannot be rendered (e.g. roles out of order); it is skipped with this message."""


@dataclass
class Rendered:
    text: str
    spans: list  # [(start, end)] character ranges that are trained


@dataclass
class Tokenized:
    input_ids: list
    labels: list
    file: str = ""
    line: int = 0

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (the first position is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def _tok_str(tokenizer, name: str) -> str:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) else ""


# ---- chat templates ------------------------------------------------------------------------------

def get_chat_template(tokenizer) -> Optional[str]:
    """The tokenizer's jinja chat template: the attribute (transformers >= 4.34), the tokenizer_config.json
    entry (older transformers keep it in init_kwargs) or chat_template.jinja next to the tokenizer files."""
    tpl = getattr(tokenizer, "chat_template", None)
    if not tpl:
        tpl = (getattr(tokenizer, "init_kwargs", None) or {}).get("chat_template")
    if not tpl:
        folder = getattr(tokenizer, "name_or_path", None)
        if folder and Path(folder, "chat_template.jinja").is_file():
            tpl = Path(folder, "chat_template.jinja").read_text(encoding="utf-8")
        elif folder and Path(folder, "tokenizer_config.json").is_file():
            try:
                tpl = json.loads(Path(folder, "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError):
                tpl = None
    if isinstance(tpl, dict):  # {"default": ..., "tool_use": ...}
        tpl = tpl.get("default")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl or None


class ChatTemplateRenderer:
    """Renders messages with the tokenizer's chat template.

    Uses ``tokenizer.apply_chat_template`` where transformers has it; transformers < 4.34 (the version the
    A1111 WebUI pins) has no chat templates, so the same jinja template is rendered with jinja2's sandbox and
    the variables transformers passes (messages, bos_token, eos_token, add_generation_prompt, raise_exception).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = get_chat_template(tokenizer)
        if not self.template:
            raise ConfigError("prompt_template: chat-template, but the tokenizer of base_model has no chat_template; "
                              "use llama2-inst or chatml, or add a chat_template to its tokenizer_config.json")
        self._compiled = None
        self._native = hasattr(tokenizer, "apply_chat_template") and bool(getattr(tokenizer, "chat_template", None))

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._native:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            except Exception as e:  # jinja's TemplateError and raise_exception() in the template
                raise SampleError(f"the tokenizer's chat template rejected this conversation: {e}") from None
        return self._render_jinja(messages, add_generation_prompt)

    def _render_jinja(self, messages, add_generation_prompt):
        if self._compiled is None:
            try:
                from jinja2.exceptions import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise ConfigError("prompt_template: chat-template needs jinja2 with this transformers version; "
                                  "pip install jinja2") from None

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            self._compiled = env.from_string(self.template)
        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{k: _tok_str(self.tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
        except Exception as e:
            raise SampleError(f"the tokenizer's chat template rejected this conversation: {e}") from None


def template_note(template: str, tokenizer) -> Optional[str]:
    """A warning about a template that this tokenizer does not know as special tokens, or None."""
    if template == "chatml" and len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) != 1:
        return ("prompt_template chatml: <|im_start|> and <|im_end|> are not special tokens of this tokenizer, "
                "so they are learned as ordinary text; stop generation on the text <|im_end|>, or use "
                "prompt_template: chat-template / llama2-inst for this model")
    return None


# ---- rendering -------------------------------------------------------------------------------------

class Renderer:
    def __init__(self, template: str, tokenizer):
        if template not in TEMPLATES:
            raise ConfigError(f"prompt_template: {template!r} is not allowed; choose one of {', '.join(TEMPLATES)}")
        self.template = template
        self.tokenizer = tokenizer
        self.bos = _tok_str(tokenizer, "bos_token")
        self.eos = _tok_str(tokenizer, "eos_token")
        self.chat = ChatTemplateRenderer(tokenizer) if template == "chat-template" else None

    def __call__(self, sample: TextSample) -> Rendered:
        if sample.kind == "text":
            text = self.bos + sample.text + self.eos
            return Rendered(text, [(len(self.bos), len(text))])
        if self.template == "none":
            if sample.kind == "completion":
                head = self.bos + sample.prompt
                text = head + sample.completion + self.eos
                return Rendered(text, [(len(head), len(text))])
            raise ConfigError(f"{sample.where}: chat data (\"messages\") needs a prompt_template that formats "
                              f"conversations: llama2-inst, chatml or chat-template (prompt_template is none)")
        messages = sample.as_messages()
        if self.template == "llama2-inst":
            return self._llama2(messages)
        if self.template == "chatml":
            return self._chatml(messages)
        return self._chat_template(messages)

    def _llama2(self, messages: list[dict]) -> Rendered:
        system = None
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise SampleError("llama2-inst allows one system message, and only as the first message")
        text, spans = "", []
        for k, m in enumerate(messages):
            want = "user" if k % 2 == 0 else "assistant"
            if m["role"] != want:
                raise SampleError(f"llama2-inst needs user and assistant messages in turn; message {k + 1} is "
                                  f"{m['role']!r} where {want!r} was expected")
            if want == "user":
                content = m["content"].strip()
                if k == 0 and system is not None:
                    content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
                text += f"{self.bos}[INST] {content} [/INST]"
            else:
                start = len(text)
                text += f" {m['content'].strip()} {self.eos}"
                spans.append((start, len(text)))
        return Rendered(text, spans)

    def _chatml(self, messages: list[dict]) -> Rendered:
        text, spans = "", []
        for m in messages:
            head = f"<|im_start|>{m['role']}\n"
            if m["role"] == "assistant":
                text += head
                start = len(text)
                text += m["content"] + "<|im_end|>"
                spans.append((start, len(text)))
                text += "\n"
            else:
                text += head + m["content"] + "<|im_end|>\n"
        if self.eos and self.eos != "<|im_end|>" and messages[-1]["role"] == "assistant":
            # so that generation stops where the answer ends with tokenizers whose eos is not <|im_end|>
            start = len(text)
            text += self.eos
            spans.append((start, len(text)))
        return Rendered(text, spans)

    def _chat_template(self, messages: list[dict]) -> Rendered:
        full = self.chat(messages)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.chat(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.chat(messages[:i + 1])
            if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(upto)
            else:  # templates that render earlier turns differently: find the answer's text instead
                start = full.find(m["content"], cursor)
                if start < 0 or not m["content"]:
                    raise SampleError(f"cannot locate assistant message {i + 1} in the chat template's output")
                end = start + len(m["content"])
            spans.append((start, end))
            cursor = end
        return Rendered(full, spans)


# ---- tokenization ---------------------------------------------------------------------------------

def tokenize_rendered(tokenizer, rendered: Rendered) -> Tokenized:
    text, spans = rendered.text, rendered.spans
    if getattr(tokenizer, "is_fast", False):
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = []
            for tid, (s, e) in zip(ids, enc["offset_mapping"]):
                trained = any((s < b and e > a) or (s == e and a <= s < b) for a, b in spans)
                labels.append(tid if trained else IGNORE_INDEX)
            return Tokenized(ids, labels)
        except NotImplementedError:
            pass
    # slow tokenizer: tokenize the pieces between span boundaries
    cuts = sorted({0, len(text), *[x for span in spans for x in span]})
    ids, labels = [], []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        trained = any(sa <= a and b <= sb for sa, sb in spans)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return Tokenized(ids, labels)


def render_and_tokenize(sample: TextSample, renderer: Renderer, tokenizer) -> Tokenized:
    tok = tokenize_rendered(tokenizer, renderer(sample))
    tok.file, tok.line = sample.file, sample.line
    return tok
