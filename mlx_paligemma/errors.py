"""The package's one error hierarchy: callers catch `PaliGemmaError`, CLIs print its message."""


class PaliGemmaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(PaliGemmaError):
    """config.json is missing, malformed, or describes a model we do not implement."""


class CheckpointError(PaliGemmaError):
    """The weights cannot be found, fetched, or do not match the model they claim to be."""


class ProcessorError(PaliGemmaError):
    """An image or prompt cannot be turned into model inputs."""


class ImageTooLargeError(ProcessorError):
    """An image file over the pixel limit (`max_image_pixels`), refused before it is decoded."""

    def __init__(self, path: str, width: int, height: int, limit: int, how_to_raise: str = "max_image_pixels"):
        self.path, self.width, self.height, self.limit = path, width, height, limit
        super().__init__(
            f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit of "
            f"{limit / 1e6:g} megapixels; raise the limit ({how_to_raise}) to read it"
        )


class MissingDependencyError(PaliGemmaError, ImportError):
    """An optional package is not installed (torch for the PyTorch backend); the message says what to install.

    Also an ImportError, so code that probes for optional backends keeps working.
    """
