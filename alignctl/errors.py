"""User-facing errors.

An ``AlignctlError`` is printed by the CLI as one clear line (no traceback): its message must
say what is wrong and how to fix it. Anything else that escapes is a bug and keeps its traceback.
"""


class AlignctlError(Exception):
    """A problem with the user's input, config, data or environment."""


class ConfigError(AlignctlError):
    """The composed config is invalid."""


class DataError(AlignctlError):
    """A dataset row or file cannot be used."""


class ModelLoadError(AlignctlError):
    """A model or tokenizer cannot be loaded."""
