"""The Python API: ``Captioner.from_pretrained(...).caption(images)``.

This is the only call the CLI and the service make into the model; both batch by passing lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image

from captioner.checkpoint import ModelInfo, load_model
from captioner.decoding import Generators, Hypothesis, SearchOptions, sampling_generators, search
from captioner.errors import OptionError
from captioner.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, ImageSource
from captioner.model import CaptionModel
from captioner.vocab import Vocabulary

PACKAGED_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights" / "default"
MODEL_DIR_VARIABLE = "CAPTIONER_MODEL_DIR"


def default_model_dir() -> Path:
    """``$CAPTIONER_MODEL_DIR`` if set, else the model shipped in ``weights/default``."""
    return Path(os.environ.get(MODEL_DIR_VARIABLE) or PACKAGED_MODEL_DIR)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA when a GPU is visible, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise OptionError(f"unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device 'cuda' was asked for but no CUDA GPU is available")
    return resolved


@dataclass(frozen=True)
class Caption:
    caption: str
    score: float  # log-probability / length ** length_penalty; higher is better
    log_prob: float
    words: list[str]
    truncated: bool  # ended by max_length rather than by the model choosing <end>


@dataclass(frozen=True)
class CaptionResult:
    """The captions of one image, best first. ``attention`` (len(words), grid, grid) is the best
    caption's attention over the feature grid for each word; each map sums to 1."""

    caption: str
    score: float
    words: list[str]
    attention: np.ndarray
    n_best: list[Caption]


CPU_ENCODER_BATCH_SIZE = 2


class Captioner:
    def __init__(
        self,
        model: CaptionModel,
        info: ModelInfo,
        device: torch.device,
        encoder_batch_size: int | None = None,
        prepare_encoder: bool = True,
        encoder_threads: int | None = None,
    ) -> None:
        """``encoder_batch_size`` splits each batch for the CNN encoder only (None: 2 images per call on
        a CPU, the whole batch on a GPU), and on a CPU ``encoder_threads`` threads (None: torch's
        intra-op thread count) encode those slices side by side. A CNN with depthwise convolutions
        gains little from splitting one call over cores and its cost per image rises again in larger
        calls, once the activations no longer fit in the cache; giving each core its own images works
        better (EfficientNet-Lite0 at 224 px on 2 cores, 16 images: 10.9-11.3 ms per image in slices
        of 2 on 2 threads, 11.0-16.6 in slices of 4 one after the other, 12.4-12.6 in slices of 2 one
        after the other). A decoder step costs nearly the same for 1 or 100 rows, so the decoder runs
        on the whole batch.

        The Captioner takes ``model`` over for inference: its encoder is frozen and, unless
        ``prepare_encoder`` is False (for comparisons), prepared (``Encoder.prepare_for_inference``)."""
        model.encoder.set_fine_tuning(0)  # inference only: no parameter needs a gradient
        self.model = model.to(device).eval()
        if prepare_encoder:
            self.model.encoder.prepare_for_inference()
        self.info = info
        self.device = device
        self.grid_size = model.encoder.grid_size
        on_cpu = device.type == "cpu"
        self.encoder_batch_size = encoder_batch_size or (CPU_ENCODER_BATCH_SIZE if on_cpu else None)
        threads = (encoder_threads or torch.get_num_threads()) if on_cpu else 1
        # The pool starts its threads on first use, so a Captioner built in one process and used only
        # in a forked child (a gunicorn worker) gets them in the child.
        self._encoder_pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="captioner-encoder") if threads > 1 else None
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        encoder_batch_size: int | None = None,
        encoder_threads: int | None = None,
    ) -> Captioner:
        """Load a model directory; no ``path`` loads the default model (see ``default_model_dir``)."""
        resolved = resolve_device(device)
        model, info = load_model(Path(path) if path is not None else default_model_dir(), resolved)
        return cls(model, info, resolved, encoder_batch_size, encoder_threads=encoder_threads)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.info.vocabulary

    def preprocess(
        self,
        image: ImageSource | torch.Tensor,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    ) -> torch.Tensor:
        """Any accepted image input -> the model's normalised (3, S, S) tensor; a tensor passes through
        unchanged (it is taken to be preprocessed already, e.g. by a data-loading worker). The image is
        decoded at the size the model needs, not at full size (``load_image``'s ``min_size``), within
        ``max_pixels`` and ``max_decode_bytes`` (see ``load_image``)."""
        size = self.info.preprocessing.image_size
        if isinstance(image, torch.Tensor):
            if image.shape != (3, size, size):
                raise OptionError(f"a preprocessed image must have shape (3, {size}, {size}), not {tuple(image.shape)}")
            return image
        return self.info.preprocessing.load(image, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes)

    @overload
    def caption(self, images: Sequence[ImageSource | torch.Tensor], **options: Any) -> list[CaptionResult]: ...

    @overload
    def caption(self, images: ImageSource | torch.Tensor, **options: Any) -> CaptionResult: ...

    def caption(
        self,
        images: Sequence[ImageSource | torch.Tensor] | ImageSource | torch.Tensor,
        beam_size: int = 3,
        max_length: int = 20,
        n_best: int = 1,
        length_penalty: float | None = None,
        sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        batch_size: int = 32,
        no_repeat_ngram_size: int | None = None,
        repetition_penalty: float | None = None,
        distinct: bool = True,
    ) -> list[CaptionResult] | CaptionResult:
        """Caption one image (returns one result) or a list of images (returns a list, same order).

        Images may be paths, encoded bytes, file objects, PIL images or preprocessed tensors. An input
        that is not a usable image raises ``ImageError`` (its ``code`` says why); bad options raise
        ``OptionError``. ``length_penalty``, ``no_repeat_ngram_size`` and ``repetition_penalty`` left
        at None take the model's own settings (``model.json``'s ``decoding``), else the search's
        defaults (``SearchOptions``).

        Sampling (``sample=True``): ``temperature`` > 0 (towards 0 it picks the likeliest word, as
        greedy search does), ``top_k`` > 0 draws among exactly that many words (ties broken towards the
        lower word id), and ``n_best`` > 1 gives distinct captions unless ``distinct=False`` (fewer
        than ``n_best`` when the model offers fewer within ``decoding.DISTINCT_SAMPLE_ROUNDS`` rounds
        of draws). ``seed`` (an integer) gives each image its own random stream, seeded from the seed
        and the image's index in ``images``: the same seed, the same image at the same index, the same
        options and the same model on the same device sample the same captions, whatever the other
        images of the call and ``batch_size``. An image at another index, or among other images put
        first, draws from another stream. Without a seed, sampling draws from torch's global stream.
        """
        single = _is_single(images)
        batch = [images] if single else list(images)  # type: ignore[list-item]
        options = self.search_options(
            beam_size=beam_size,
            max_length=max_length,
            n_best=n_best,
            length_penalty=length_penalty,
            sample=sample,
            temperature=temperature,
            top_k=top_k,
            no_repeat_ngram_size=no_repeat_ngram_size,
            repetition_penalty=repetition_penalty,
            distinct=distinct,
        )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
            raise OptionError(f"batch_size must be an integer from 1 to 4096, not {batch_size!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise OptionError(f"seed must be an integer, not {seed!r}")
        pixels = [self.preprocess(image) for image in batch]
        results: list[CaptionResult] = []
        for start in range(0, len(pixels), batch_size):
            chunk = torch.stack(pixels[start : start + batch_size]).to(self.device)  # (N, 3, S, S)
            indices = range(start, start + len(chunk))
            generators = sampling_generators(seed, indices, self.device) if seed is not None else None
            results.extend(self.caption_pixels(chunk, options, generators))
        return results[0] if single else results

    def search_options(self, **options: Any) -> SearchOptions:
        """``SearchOptions`` from the options given (None: not given) over the model's own decoding
        settings over the search's defaults."""
        given = {name: value for name, value in options.items() if value is not None}
        try:
            return SearchOptions(**{**self.info.decoding, **given})
        except TypeError:  # SearchOptions checks its values' types itself: this is a name it does not know
            unknown = sorted(set(given) - {f.name for f in fields(SearchOptions)})
            raise OptionError(f"unknown search options {unknown}") from None

    @torch.inference_mode()
    def caption_pixels(
        self, pixels: torch.Tensor, options: SearchOptions, generator: Generators = None
    ) -> list[CaptionResult]:
        """Caption a preprocessed batch (N, 3, S, S) already on the model's device. ``generator``
        (sampling): one per image (``decoding.sampling_generators``) makes each image's samples
        independent of the batch; a single one is shared by all rows."""
        return self.caption_features(self.encode(pixels), options, generator)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder features (N, R, C) of a preprocessed batch, computed in slices of ``encoder_batch_size``,
        side by side on the encoder threads when there are several."""
        slices = pixels.split(self.encoder_batch_size) if self.encoder_batch_size else [pixels]
        if self._encoder_pool is None or len(slices) == 1:
            return torch.cat([self._encode_slice(part) for part in slices])  # (N, R, C)
        return torch.cat(list(self._encoder_pool.map(self._encode_slice, slices)))  # (N, R, C), in order

    def _encode_slice(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # per thread: the caller's mode does not carry over into a pool thread
            return self.model.encoder(pixels)  # (n, R, C)

    @torch.inference_mode()
    def caption_features(
        self, features: torch.Tensor, options: SearchOptions, generator: Generators = None
    ) -> list[CaptionResult]:
        """Caption encoder features (N, R, C), e.g. from a feature cache."""
        found = search(self.model.decoder, features.to(self.device, torch.float32), options, generator)
        return [self._result(hypotheses) for hypotheses in found]

    def _result(self, hypotheses: list[Hypothesis]) -> CaptionResult:
        captions = [self._caption(h) for h in hypotheses]
        best, best_hypothesis = captions[0], hypotheses[0]
        g = self.grid_size
        attention = best_hypothesis.attention[: len(best.words)].reshape(len(best.words), g, g).numpy()
        return CaptionResult(best.caption, best.score, best.words, attention, captions)

    def _caption(self, hypothesis: Hypothesis) -> Caption:
        words = self.info.vocabulary.decode(hypothesis.tokens)
        return Caption(" ".join(words), hypothesis.score, hypothesis.log_prob, words, hypothesis.truncated)


def _is_single(images: object) -> bool:
    return isinstance(images, str | bytes | bytearray | memoryview | os.PathLike | Image.Image | torch.Tensor) or (
        hasattr(images, "read")
    )
