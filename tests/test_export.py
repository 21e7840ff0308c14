"""Exporting a model directory as float16 with new metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import METADATA_FILE, WEIGHTS_FILE, load_model, read_info
from captioner.errors import CheckpointError
from training.export import export, main


def test_export_writes_a_half_precision_copy_with_new_metadata(tiny_model_dir: Path, tmp_path: Path) -> None:
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"CIDEr": 1.5}))
    out = tmp_path / "shipped"
    argv = ["--checkpoint", str(tiny_model_dir), "--out", str(out), "--dtype", "float16"]
    assert main([*argv, "--name", "shipped", "--version", "2", "--metrics", str(scores)]) == 0
    info = read_info(out)
    assert (info.name, info.version, info.metrics["CIDEr"]) == ("shipped", "2", 1.5)
    assert info.provenance["dtype"] == "float16" and info.vocabulary == read_info(tiny_model_dir).vocabulary
    assert (out / WEIGHTS_FILE).stat().st_size < 0.6 * (tiny_model_dir / WEIGHTS_FILE).stat().st_size
    original, _ = load_model(tiny_model_dir)
    copy, _ = load_model(out)
    for name, tensor in copy.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, original.state_dict()[name].half().float(), rtol=0, atol=0)


def test_export_reports_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "scores.json"
    bad.write_text("[1, 2]")
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"), "--metrics", str(bad)]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_export_sets_the_decoding_defaults_over_the_sources(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    export(tiny_model_dir, source, decoding={"length_penalty": 0.7, "no_repeat_ngram_size": 2})
    assert read_info(source).decoding == {"length_penalty": 0.7, "no_repeat_ngram_size": 2}
    out = tmp_path / "shipped"
    argv = ["--checkpoint", str(source), "--out", str(out), "--no-repeat-ngram-size", "3"]
    assert main([*argv, "--repetition-penalty", "1.2"]) == 0
    # given: replaced; not given: kept from the source
    assert read_info(out).decoding == {"length_penalty": 0.7, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2}
    assert json.loads((out / METADATA_FILE).read_text())["decoding"]["no_repeat_ngram_size"] == 3
    plain = tmp_path / "plain"
    assert main(["--checkpoint", str(tiny_model_dir), "--out", str(plain), "--length-penalty", "0"]) == 0
    assert read_info(plain).decoding == {"length_penalty": 0.0}
    with pytest.raises(CheckpointError, match="repetition_penalty"):
        export(tiny_model_dir, tmp_path / "bad", decoding={"repetition_penalty": 0.5})
    with pytest.raises(CheckpointError, match="unknown decoding settings"):
        export(tiny_model_dir, tmp_path / "bad", decoding={"beam_size": 5})
    assert not (tmp_path / "bad").exists(), "nothing is written for a bad setting"


@pytest.mark.parametrize(
    "option, message",
    [
        (["--repetition-penalty", "0.5"], "repetition_penalty"),
        (["--no-repeat-ngram-size", "-1"], "no_repeat_ngram_size"),
        (["--no-repeat-ngram-size", "11"], "no_repeat_ngram_size"),
        (["--length-penalty", "nan"], "length_penalty"),
    ],
)
def test_export_refuses_bad_decoding_settings(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    out = tmp_path / "x"
    assert main(["--checkpoint", str(tiny_model_dir), "--out", str(out), *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
