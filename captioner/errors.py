"""The exceptions captioner raises for problems the caller caused.

Every message is meant for the person who supplied the input; the CLI turns these into error
records and the service into 4xx JSON responses, using ``code`` as the stable machine-readable part.
"""


class CaptionerError(Exception):
    """Base class of every error captioner raises on purpose."""

    code = "captioner_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ImageError(CaptionerError):
    """An input that cannot be turned into an image.

    ``code`` says why: ``empty``, ``not_an_image``, ``truncated``, ``undecodable``,
    ``too_many_pixels``, ``too_costly`` (decoding it would take more memory than allowed) or
    ``unreadable`` (the file could not be opened).
    """

    code = "invalid_image"


class CheckpointError(CaptionerError):
    """A model directory that is missing, incomplete, unsafe (pickled) or inconsistent."""

    code = "invalid_checkpoint"


class OptionError(CaptionerError, ValueError):
    """A decoding option outside its valid range (beam size, max length, temperature...)."""

    code = "invalid_option"
