"""captioner: image captioning with a pretrained CNN encoder and an attention LSTM decoder
(Show, Attend and Tell, Xu et al. 2015).

The names below are imported on first use, so that light modules (``captioner.vocab``,
``captioner.errors``) load without pulling in torch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Caption": "captioner.api",
    "CaptionResult": "captioner.api",
    "Captioner": "captioner.api",
    "CaptionerError": "captioner.errors",
    "CheckpointError": "captioner.errors",
    "ImageError": "captioner.errors",
    "OptionError": "captioner.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
