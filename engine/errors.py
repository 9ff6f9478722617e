"""The engine's exception classes: a small set, raised at the boundary with a message naming the input."""


class ModuSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(ModuSegError, ValueError):
    """An image, mask, label list or array that is not what the call expects."""


class BankError(ModuSegError):
    """A feature bank that cannot be used: corrupt, truncated, another format version or another backbone."""


class ModelError(ModuSegError, RuntimeError):
    """A model that cannot be loaded or run (missing weights, missing optional dependency, bad output)."""
