"""The model directory: safetensors + JSON, exact round trips, and refusal of pickles."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, CheckpointError
from captioner.checkpoint import METADATA_FILE, WEIGHTS_FILE, load_model, read_info, save_model
from captioner.decoding import SearchOptions
from tests.conftest import make_model_dir


def scene_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))


def test_save_load_caption_gives_identical_outputs(tmp_path: Path) -> None:
    directory = make_model_dir(tmp_path / "model", seed=3)
    model, info = load_model(directory)
    again = make_model_dir(tmp_path / "copy", seed=3)  # the same seed builds the same weights
    for (name, a), (_, b) in zip(model.state_dict().items(), load_model(again)[0].state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    images = [scene_image(i) for i in range(3)]
    first = Captioner.from_pretrained(directory, device="cpu").caption(images, beam_size=3, n_best=2)
    # Save what was loaded, load it again: every output must be bit-identical.
    from captioner.checkpoint import save_model

    resaved = save_model(tmp_path / "resaved", model, info)
    second = Captioner.from_pretrained(resaved, device="cpu").caption(images, beam_size=3, n_best=2)
    for a, b in zip(first, second, strict=True):
        assert a.caption == b.caption and a.score == b.score
        assert np.array_equal(a.attention, b.attention)
        assert [(c.caption, c.score) for c in a.n_best] == [(c.caption, c.score) for c in b.n_best]
    assert read_info(resaved).to_json() == info.to_json()


def test_float16_checkpoints_load_into_float32_models(tmp_path: Path) -> None:
    from captioner.checkpoint import save_model

    model, info = load_model(make_model_dir(tmp_path / "model"))
    half = save_model(tmp_path / "half", model, info, dtype=torch.float16)
    assert (half / WEIGHTS_FILE).stat().st_size < 0.6 * (tmp_path / "model" / WEIGHTS_FILE).stat().st_size
    loaded, _ = load_model(half)
    for name, tensor in loaded.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32
            torch.testing.assert_close(tensor, model.state_dict()[name].half().float(), rtol=0, atol=0)


def test_a_pickle_in_place_of_the_weights_is_refused_without_unpickling(tmp_path: Path) -> None:
    directory = make_model_dir(tmp_path / "model")
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204 - the classic pickle payload: run code on load
            return (Path.touch, (marker,))

    (directory / WEIGHTS_FILE).write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(directory)
    torch.save({"a": torch.zeros(2)}, directory / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(directory)
    assert not marker.exists()


def test_a_directory_of_pickled_weights_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "legacy"
    directory.mkdir()
    torch.save({"a": torch.zeros(2)}, directory / "model.pt")
    with pytest.raises(CheckpointError, match=r"pickled weights \(model.pt\)"):
        load_model(directory)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / METADATA_FILE).unlink(), "no model.json"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "no model.safetensors"),
        (lambda d: (d / METADATA_FILE).write_text("{not json"), "not a valid model description"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage"), "safetensors"),
        (lambda d: _edit_json(d, lambda j: j.update(format_version=99)), "version 99"),
        (lambda d: _edit_json(d, lambda j: j["config"]["decoder"].update(hidden_dim=64)), "wrong shape"),
        (lambda d: _edit_json(d, lambda j: j["config"]["decoder"].update(typo=1)), "unknown DecoderConfig"),
        (lambda d: _edit_json(d, lambda j: j["config"]["decoder"].update(num_layers=2)), "does not match"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding={"beam_size": 5})), "unknown decoding settings"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding={"repetition_penalty": 0.5})), "repetition_penalty must"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding={"no_repeat_ngram_size": 11})), "no_repeat_ngram_size"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding={"no_repeat_ngram_size": 2.5})), "no_repeat_ngram_size"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding={"length_penalty": "0.5"})), "length_penalty must be a"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding={"length_penalty": -1})), "length_penalty must be >= 0"),
        (lambda d: _edit_json(d, lambda j: j.update(decoding=[1, 2])), "not a valid model description"),
    ],
)
def test_damaged_directories_raise_checkpoint_errors(tmp_path: Path, damage, message: str) -> None:
    directory = make_model_dir(tmp_path / "model")
    damage(directory)
    with pytest.raises(CheckpointError, match=message):
        load_model(directory)


def test_decoding_settings_round_trip_through_the_model_directory(tmp_path: Path) -> None:
    model, info = load_model(make_model_dir(tmp_path / "model"))
    assert info.decoding == {}
    decoding = {"length_penalty": 0.7, "no_repeat_ngram_size": 3, "repetition_penalty": 1.25}
    saved = save_model(tmp_path / "tuned", model, replace(info, decoding=decoding))
    assert json.loads((saved / METADATA_FILE).read_text())["decoding"] == decoding
    again = read_info(saved)
    assert again.decoding == decoding and isinstance(again.decoding["no_repeat_ngram_size"], int)
    assert load_model(saved)[1].decoding == decoding


def test_a_model_json_without_decoding_still_loads(tmp_path: Path) -> None:
    directory = make_model_dir(tmp_path / "model")
    _edit_json(directory, lambda j: j.pop("decoding"))  # as model directories written before it existed
    assert "decoding" not in json.loads((directory / METADATA_FILE).read_text())
    assert read_info(directory).decoding == {}
    assert Captioner.from_pretrained(directory, device="cpu").search_options() == SearchOptions()


@pytest.mark.parametrize(
    "decoding, message",
    [
        ({"n_best": 2}, r"unknown decoding settings \['n_best'\]"),
        ({"repetition_penalty": 0.5}, "repetition_penalty must lie in"),
        ({"no_repeat_ngram_size": True}, "no_repeat_ngram_size must be an integer"),
    ],
)
def test_invalid_decoding_settings_are_refused_when_made(tmp_path: Path, decoding: dict, message: str) -> None:
    _, info = load_model(make_model_dir(tmp_path / "model"))
    with pytest.raises(CheckpointError, match=message):
        replace(info, decoding=decoding)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Captioner.from_pretrained(tmp_path / "absent", device="cpu")


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    directory = make_model_dir(tmp_path / "model")
    assert sorted(p.name for p in directory.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in directory.iterdir()), "readable by the service's user"
    shutil.rmtree(directory)


def _edit_json(directory: Path, edit) -> None:
    data = json.loads((directory / METADATA_FILE).read_text())
    edit(data)
    (directory / METADATA_FILE).write_text(json.dumps(data))
