"""LoRA for text-generation models (task_type: text-generation): transformers causal LMs + peft.

Public API (imported lazily, so `import lora_trainer.text` stays cheap):
- train_text(cfg, events, stop) -> Path of the adapter folder (or of the checkpoint when stopped)
- merge_adapter(adapter, output, base_model=None, overwrite=False) -> Path of the merged model folder
- read_text_samples(folder) -> (samples, issues, ignored files)
- build_dataset(cfg, tokenizer) -> TextDataset (tokenized, split, packed)
- build_text_report(cfg) -> TextReport (what `check` prints for a text dataset)
"""
from __future__ import annotations

_EXPORTS = {
    "train_text": "trainer",
    "TextTrainingError": "trainer",
    "merge_adapter": "model",
    "DEFAULT_TARGETS": "model",
    "resolve_target_modules": "model",
    "read_text_samples": "data",
    "DataIssue": "data",
    "TextSample": "data",
    "build_dataset": "dataset",
    "TextDataset": "dataset",
    "build_text_report": "report",
    "run_text_check": "report",
    "Renderer": "templates",
    "tokenize_rendered": "templates",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
