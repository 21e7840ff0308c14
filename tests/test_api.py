"""The Python API: every kind of input, every odd image mode, bad input as ImageError."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, CaptionResult, ImageError, OptionError
from captioner.api import MODEL_DIR_VARIABLE, default_model_dir, resolve_device
from captioner.checkpoint import METADATA_FILE
from captioner.decoding import SearchOptions


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return Captioner.from_pretrained(tiny_model_dir, device="cpu")


def photo(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def with_decoding(source: Path, target: Path, decoding: dict) -> Path:
    """A copy of the model directory ``source`` (same weights) whose model.json sets ``decoding``."""
    shutil.copytree(source, target)
    metadata = json.loads((target / METADATA_FILE).read_text())
    metadata["decoding"] = decoding
    (target / METADATA_FILE).write_text(json.dumps(metadata))
    return target


def repeated_ngrams(words: list[str], n: int) -> int:
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(ngrams) - len(set(ngrams))


def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def odd_images() -> dict[str, Image.Image | bytes]:
    base = photo()
    gradient = np.tile(np.linspace(0, 65535, 96, dtype=np.uint16), (64, 1))
    frames = [Image.new("P", (40, 30), i) for i in (1, 2)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    return {
        "rgba": base.convert("RGBA"),
        "palette": base.convert("P"),
        "grayscale": base.convert("L"),
        "bilevel": base.convert("1"),
        "cmyk-jpeg": encoded(base.convert("CMYK"), "JPEG"),
        "16-bit-png": encoded(Image.fromarray(gradient), "PNG"),
        "animated-gif": animated.getvalue(),
        "float": Image.fromarray(np.random.default_rng(0).random((20, 30), dtype=np.float32)),
    }


def test_every_odd_mode_captions(captioner: Captioner) -> None:
    images = odd_images()
    results = captioner.caption(list(images.values()), beam_size=2)
    assert len(results) == len(images)
    for result in results:
        assert isinstance(result, CaptionResult)
        assert result.caption == " ".join(result.words)
        assert result.attention.shape == (len(result.words), captioner.grid_size, captioner.grid_size)


def test_paths_bytes_files_pil_and_tensors_caption_alike(captioner: Captioner, tmp_path: Path) -> None:
    image = photo(seed=4)
    data = encoded(image, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    pixels = captioner.preprocess(image)
    inputs = [image, data, bytearray(data), str(path), path, io.BytesIO(data), pixels]
    results = captioner.caption(inputs, beam_size=3, n_best=2)
    assert len({r.caption for r in results}) == 1, "one image, one caption, whatever the input type"
    # Scores may differ in the last bits: BLAS rounds the rows of a batch in a position-dependent order.
    assert max(r.score for r in results) - min(r.score for r in results) < 1e-6
    single = captioner.caption(path, beam_size=3, n_best=2)
    assert isinstance(single, CaptionResult) and single.caption == results[0].caption
    assert [c.caption for c in single.n_best] == [c.caption for c in results[0].n_best]
    assert len(single.n_best) == 2 and single.n_best[0].score >= single.n_best[1].score


def test_batch_size_does_not_change_the_captions(captioner: Captioner) -> None:
    images = [photo(seed=i) for i in range(5)]
    whole = captioner.caption(images, batch_size=32)
    pieces = captioner.caption(images, batch_size=2)
    assert [r.caption for r in whole] == [r.caption for r in pieces]
    assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(whole, pieces, strict=True))


def test_encoding_in_slices_gives_the_same_captions(tiny_model_dir: Path, captioner: Captioner) -> None:
    images = [photo(seed=i) for i in range(5)]
    one_at_a_time = Captioner.from_pretrained(tiny_model_dir, device="cpu", encoder_batch_size=1)
    assert captioner.encoder_batch_size == 2, "on a CPU the encoder runs in slices of 2 by default"
    sliced = one_at_a_time.caption(images)
    whole = captioner.caption(images)
    assert [r.caption for r in sliced] == [r.caption for r in whole]
    assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(sliced, whole, strict=True))


def test_slices_encoded_side_by_side_on_threads_come_back_in_order(tiny_model_dir: Path) -> None:
    pixels = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    alone = Captioner.from_pretrained(tiny_model_dir, device="cpu", encoder_batch_size=1, encoder_threads=1)
    threaded = Captioner.from_pretrained(tiny_model_dir, device="cpu", encoder_batch_size=2, encoder_threads=3)
    assert alone._encoder_pool is None
    seen_threads: set[str] = set()
    threaded.model.encoder.register_forward_hook(
        lambda module, inputs, output: seen_threads.add(threading.current_thread().name)
    )
    size = threaded.info.preprocessing.image_size
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size))  # (7, 3, S, S)
    expected = alone.encode(pixels)  # (7, R, C)
    got = threaded.encode(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert seen_threads and all(name.startswith("captioner-encoder") for name in seen_threads)
    assert not got.requires_grad and got.is_inference(), "the pool threads run in inference mode too"


def test_attention_maps_are_distributions_over_the_grid(captioner: Captioner) -> None:
    result = captioner.caption(photo(), beam_size=1, max_length=6)
    assert result.words, "a random model at max_length 6 still says something"
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_sampling_with_a_seed_is_reproducible(captioner: Captioner) -> None:
    image = photo()
    first = captioner.caption([image] * 6, sample=True, temperature=2.0, seed=11)
    again = captioner.caption([image] * 6, sample=True, temperature=2.0, seed=11)
    assert [r.caption for r in first] == [r.caption for r in again]
    assert len({r.caption for r in first}) > 1


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"", "empty"),
        (b"this is a text file, not a picture\n", "not_an_image"),
        (encoded(photo((300, 200)), "JPEG")[:600], "truncated"),
    ],
)
def test_bad_input_raises_image_error_with_a_reason(captioner: Captioner, payload: bytes, code: str) -> None:
    with pytest.raises(ImageError) as raised:
        captioner.caption([photo(), payload])
    assert raised.value.code == code and raised.value.message


def test_missing_file_and_bad_tensor(captioner: Captioner, tmp_path: Path) -> None:
    with pytest.raises(ImageError) as raised:
        captioner.caption(tmp_path / "absent.jpg")
    assert raised.value.code == "unreadable" and "absent.jpg" in raised.value.message
    with pytest.raises(OptionError, match="shape"):
        captioner.caption(torch.zeros(3, 10, 10))


def test_bad_options_raise_option_error(captioner: Captioner) -> None:
    with pytest.raises(OptionError, match="beam_size"):
        captioner.caption(photo(), beam_size=0)
    with pytest.raises(OptionError, match="batch_size"):
        captioner.caption(photo(), batch_size=0)
    with pytest.raises(OptionError, match="no_repeat_ngram_size"):
        captioner.caption(photo(), no_repeat_ngram_size=-1)
    with pytest.raises(OptionError, match="repetition_penalty"):
        captioner.caption(photo(), repetition_penalty=0.5)
    if not torch.cuda.is_available():  # where a GPU is present, asking for CUDA is valid
        with pytest.raises(OptionError, match="cuda"):
            resolve_device("cuda")
    with pytest.raises(OptionError, match="unknown device"):
        resolve_device("tpu:x")


def test_search_options_take_the_given_over_the_models_over_the_defaults(
    tiny_model_dir: Path, captioner: Captioner, tmp_path: Path
) -> None:
    assert captioner.info.decoding == {} and captioner.search_options() == SearchOptions()
    tuned = Captioner.from_pretrained(
        with_decoding(tiny_model_dir, tmp_path / "tuned", {"length_penalty": 0.5, "no_repeat_ngram_size": 2}),
        device="cpu",
    )
    defaults = tuned.search_options(beam_size=2, repetition_penalty=None)  # None: not given
    assert defaults == SearchOptions(beam_size=2, length_penalty=0.5, no_repeat_ngram_size=2, repetition_penalty=1.0)
    given = tuned.search_options(no_repeat_ngram_size=0, length_penalty=0.0, repetition_penalty=1.5)
    assert (given.no_repeat_ngram_size, given.length_penalty, given.repetition_penalty) == (0, 0.0, 1.5)
    with pytest.raises(OptionError, match="beam_width"):
        tuned.search_options(beam_width=3)
    with pytest.raises(OptionError, match="repetition_penalty"):
        tuned.search_options(repetition_penalty=0.5)


def test_a_models_no_repeat_ngram_size_is_used_unless_overridden(
    tiny_model_dir: Path, captioner: Captioner, tmp_path: Path
) -> None:
    images = [photo(seed=i) for i in range(3)]
    tuned = Captioner.from_pretrained(
        with_decoding(tiny_model_dir, tmp_path / "tuned", {"no_repeat_ngram_size": 2}), device="cpu"
    )
    for beam_size in (1, 3):
        plain = captioner.caption(images, beam_size=beam_size, max_length=20)
        assert all(repeated_ngrams(r.words, 2) > 0 for r in plain), "the test needs captions that repeat bigrams"
        banned = tuned.caption(images, beam_size=beam_size, max_length=20)
        assert all(repeated_ngrams(r.words, 2) == 0 and len(r.words) > 2 for r in banned), [r.caption for r in banned]
        assert all(b.caption != p.caption for b, p in zip(banned, plain, strict=True))
        assert [r.caption for r in banned] == [
            r.caption for r in captioner.caption(images, beam_size=beam_size, max_length=20, no_repeat_ngram_size=2)
        ], "the same weights with the same setting given explicitly"
        overridden = tuned.caption(images, beam_size=beam_size, max_length=20, no_repeat_ngram_size=0)
        assert [r.caption for r in overridden] == [r.caption for r in plain], "0 given turns the model's ban off"


def test_default_model_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    monkeypatch.setenv(MODEL_DIR_VARIABLE, str(tiny_model_dir))
    assert default_model_dir() == tiny_model_dir
    assert Captioner.from_pretrained(device="cpu").info.name == "tiny-test"
    monkeypatch.delenv(MODEL_DIR_VARIABLE)
    assert default_model_dir().parts[-2:] == ("weights", "default")


def test_a_seed_reproduces_each_image_whatever_its_batch(captioner: Captioner) -> None:
    images = [photo(seed=i) for i in range(5)]
    options = {"sample": True, "temperature": 2.0, "n_best": 2, "seed": 5}

    def captions(results: list[CaptionResult]) -> list[list[str]]:
        return [[c.caption for c in result.n_best] for result in results]

    whole = captions(captioner.caption(images, **options))
    assert captions(captioner.caption(images, batch_size=2, **options)) == whole
    assert captions(captioner.caption(images, batch_size=1, **options)) == whole
    assert captions(captioner.caption(images[:1], **options)) == whole[:1]
    assert captions(captioner.caption(images[:3], **options)) == whole[:3]
    assert [c.caption for c in captioner.caption(images[0], **options).n_best] == whole[0]
    assert captions(captioner.caption(images, **{**options, "seed": 6})) != whole


def test_a_tiny_temperature_samples_as_greedy_search_does(captioner: Captioner) -> None:
    images = [photo(seed=i) for i in range(3)]
    greedy = captioner.caption(images, beam_size=1)
    sampled = captioner.caption(images, sample=True, temperature=1e-45, seed=0)
    assert [r.caption for r in sampled] == [r.caption for r in greedy]


@pytest.mark.parametrize("seed", [1.5, True, "3"])
def test_a_seed_that_is_not_an_integer_is_refused(captioner: Captioner, seed: object) -> None:
    with pytest.raises(OptionError, match="seed"):
        captioner.caption(photo(), sample=True, seed=seed)
