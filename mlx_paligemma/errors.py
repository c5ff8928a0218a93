"""The package's one error hierarchy: callers catch `PaliGemmaError`, CLIs print its message."""


class PaliGemmaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PaliGemmaError):
    """config.json is missing, malformed, or describes a model we do not implement."""


class CheckpointError(PaliGemmaError):
    """The weights cannot be found, fetched, or do not match the model they claim to be."""


class ProcessorError(PaliGemmaError):
    """An image or prompt cannot be turned into model inputs."""


class MissingDependencyError(PaliGemmaError, ImportError):
    """An optional package is not installed (torch for the PyTorch backend); the message says what to install.

    Also an ImportError, so code that probes for optional backends keeps working.
    """
