"""Exceptions shared by the whole project."""


class ConfigError(ValueError):
    """A user-facing configuration problem.

    The message names the option as typed on the command line (``--data.block_size``) and says
    how to fix it, so LightningCLI users can act on it without reading a traceback.
    """


class NonFiniteError(FloatingPointError):
    """NaN or Inf in activations, gradients or the loss; the message names the layer or the step."""


def first_line(error: BaseException, sentence: bool = False, limit: int | None = None) -> str:
    """An exception's message cut for a one-line error: its first line (or that line's first sentence, at most
    ``limit`` characters), or its type's name. Library messages run to many lines."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    line = line.split(". ")[0] if sentence else line
    return line[:limit] if limit is not None else line
