"""User-facing errors: each one names the problem in one line; the CLI prints it without a traceback."""


class MetaAugError(Exception):
    """Base class of every error caused by user input rather than a bug."""


class ConfigError(MetaAugError):
    """A bad option: bit-width out of range, unknown method or model, conflicting run folder."""


class DataError(MetaAugError):
    """Missing, empty, too small or non-finite data."""


class ModelError(MetaAugError):
    """A model or checkpoint that cannot be used: mismatched weights, unsupported layers."""


class MetaAugWarning(UserWarning):
    """Something the user should know that does not stop the job (the CLI prints it as one line)."""


def warn(message: str) -> None:
    import warnings

    warnings.warn(message, MetaAugWarning, stacklevel=2)
