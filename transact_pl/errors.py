"""Exceptions shared by the whole project."""


class ConfigError(ValueError):
    """A user-facing configuration problem.

    The message names the option as typed on the command line (``--data.block_size``) and says
    how to fix it, so LightningCLI users can act on it without reading a traceback.
    """


class NonFiniteError(FloatingPointError):
    """NaN or Inf in activations, gradients or the loss; the message names the layer or the step."""
