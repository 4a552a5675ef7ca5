"""Errors a training run ends with (kept light: the text trainer imports them without diffusers)."""


class TrainingFailed(RuntimeError):
    """The run could not go on; the message says why and what to change."""
