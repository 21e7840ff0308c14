"""The ``captioner`` command, run for real in subprocesses on folders written here, plus in-process tests of
the batch machinery (listing, sharding, resumable outputs) where a subprocess would only add start-up time.

Subprocesses that do not depend on each other run side by side: on a 2-core machine most of their time
is spent importing torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner, cli
from captioner.attention_png import canvas_size
from captioner.batch import (
    CsvOutput,
    InputError,
    JsonlOutput,
    Progress,
    Record,
    attention_file_names,
    list_inputs,
    parse_shard,
    run_batches,
    select_shard,
    shard_of,
)
from captioner.checkpoint import read_info
from captioner.encoder import grid_size_for

CLI = [sys.executable, "-m", "captioner.cli"]
# Small searches keep the runs fast; the encoder at 224 px dominates anyway.
FAST = ["--beam-size", "1", "--max-length", "3", "--batch-size", "4", "--workers", "2"]
TIMEOUT = 300


# ----------------------------------------------------------------------------------------------- helpers


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def run_side_by_side(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run independent commands concurrently; results in order."""
    processes = [
        subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = []
    for command, process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


def run_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``cli.main`` in this process (for checks that end before any real work): exit status and stderr."""
    try:
        status = cli.main(args)
    except SystemExit as exit_:  # argparse exits by itself on usage errors
        status = exit_.code
    return int(status or 0), capsys.readouterr().err


def noise(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG with a valid signature and IHDR (correct CRC) that claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def write_photos(folder: Path) -> tuple[set[str], dict[str, str]]:
    """A folder of good, oddly encoded and broken images (plus files that must be ignored).

    Returns the paths (as the CLI reports them, relative to ``folder.parent``) that must be captioned,
    and the expected error code of each path that must fail.
    """
    folder.mkdir()
    name = folder.name
    rgb = Image.fromarray(noise(40, 30, 1))
    files: dict[str, bytes] = {
        "rgb.png": encoded(rgb, "PNG"),
        "x.png": encoded(Image.fromarray(noise(24, 24, 2)), "PNG"),
        "x.jpg": encoded(Image.fromarray(noise(24, 24, 3)), "JPEG"),  # same stem as x.png
        "SHOUT.JPG": encoded(Image.fromarray(noise(20, 20, 4)), "JPEG"),
        "pic.bmp": encoded(Image.fromarray(noise(16, 16, 5)), "BMP"),
        "pic.webp": encoded(Image.fromarray(noise(16, 16, 6)), "WEBP"),
        "anim.gif": encoded(Image.fromarray(noise(16, 16, 7)).convert("P"), "GIF"),
        "scan.tiff": encoded(Image.fromarray(noise(16, 16, 8)), "TIFF"),
        "cmyk.jpg": encoded(Image.fromarray(noise(20, 20, 9, channels=4), mode="CMYK"), "JPEG"),
        "deep16.png": encoded(Image.fromarray(noise(20, 20, 10, channels=1).astype(np.uint16) * 257), "PNG"),
        "palette.png": encoded(Image.fromarray(noise(20, 20, 11)).convert("P"), "PNG"),
        "alpha.png": encoded(Image.fromarray(noise(20, 20, 12, channels=4), mode="RGBA"), "PNG"),
    }
    assert Image.open(io.BytesIO(files["deep16.png"])).mode == "I;16"
    good_jpeg = encoded(Image.fromarray(noise(64, 64, 13)), "JPEG", quality=90)
    bad: dict[str, tuple[bytes, str]] = {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "zero.jpg": (b"", "empty"),
        "text.jpg": (b"this is not a picture\n", "not_an_image"),
        "huge.png": (png_claiming(60000, 60000), "too_many_pixels"),
    }
    for file_name, data in files.items():
        (folder / file_name).write_bytes(data)
    for file_name, (data, _) in bad.items():
        (folder / file_name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image extension: ignored\n")
    (folder / ".hidden.jpg").write_bytes(files["x.jpg"])  # hidden: ignored
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.png").write_bytes(files["x.png"])  # only with --recursive
    good = {f"{name}/{file_name}" for file_name in files}
    return good, {f"{name}/{file_name}": code for file_name, (_, code) in bad.items()}


def write_noise_pngs(folder: Path, count: int, size: int = 32) -> set[str]:
    folder.mkdir()
    for i in range(count):
        Image.fromarray(noise(size, size, 1000 + i)).save(folder / f"img{i:04d}.png")
    return {f"{folder.name}/img{i:04d}.png" for i in range(count)}


def jsonl_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def repeated_bigrams(words: list[str]) -> int:
    bigrams = [tuple(words[i : i + 2]) for i in range(len(words) - 1)]
    return len(bigrams) - len(set(bigrams))


def complete_lines(path: Path) -> int:
    """How many newline-terminated, parsable records a file holds (a cut-off tail does not count)."""
    if not path.exists():
        return 0
    *lines, _ = path.read_bytes().split(b"\n")
    count = 0
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            break
        count += 1
    return count


# --------------------------------------------------------------------------------- the real command line


def test_caption_records_every_image_once_with_errors_and_attention(tmp_path: Path, tiny_model_dir: Path) -> None:
    good, bad = write_photos(tmp_path / "photos")
    args = ["caption", "photos", "--model", str(tiny_model_dir), "--output", "out.jsonl"]
    args += ["--beam-size", "2", "--n-best", "2", "--max-length", "3", "--batch-size", "4", "--workers", "2"]
    result = run_cli([*args, "--attention-dir", "attention"], tmp_path)

    assert result.returncode == 1, result.stderr  # some images failed
    assert "Traceback" not in result.stderr and "\r" not in result.stderr  # no progress bar without a terminal
    records = jsonl_records(tmp_path / "out.jsonl")
    paths = [record["path"] for record in records]
    assert sorted(paths) == sorted(good | set(bad))  # one record each; ignored files absent
    for record in records:
        if record["path"] in good:
            assert isinstance(record["caption"], str) and isinstance(record["score"], float)
            assert [alt["caption"] for alt in record["n_best"]][0] == record["caption"]
            assert len(record["n_best"]) == 2 and record["n_best"][0]["score"] >= record["n_best"][1]["score"]
        else:
            assert set(record) == {"path", "error"}
            assert record["error"]["code"] == bad[record["path"]], record
            assert record["error"]["message"]
    assert f"{len(good)} captioned, {len(bad)} failed" in result.stderr

    # One picture per captioned image, named after its stem; repeated stems numbered in input order.
    pictures = sorted(p.name for p in (tmp_path / "attention").iterdir())
    assert len(pictures) == len(good) and not [name for name in pictures if name.startswith(".")]
    by_path = {record["path"]: record for record in records}
    for path, picture in (("photos/x.jpg", "x.attention.png"), ("photos/x.png", "x-2.attention.png")):
        with Image.open(tmp_path / "attention" / picture) as image:
            assert image.format == "PNG"
            assert image.size == canvas_size(len(by_path[path]["caption"].split()))


def test_killed_run_resumes_without_losing_or_repeating_records(tmp_path: Path, tiny_model_dir: Path) -> None:
    expected = write_noise_pngs(tmp_path / "many", 200)
    output = tmp_path / "out.jsonl"
    args = ["caption", "many", "--model", str(tiny_model_dir), "--output", "out.jsonl"]
    args += ["--batch-size", "8", "--beam-size", "1", "--max-length", "2", "--workers", "2"]
    process = subprocess.Popen([*CLI, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while complete_lines(output) < 16:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no records appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    before = complete_lines(output)
    assert 16 <= before < 200

    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    records = jsonl_records(output)
    paths = [record["path"] for record in records]
    assert len(paths) == len(set(paths)) == 200 and set(paths) == expected
    assert all(isinstance(record["caption"], str) for record in records)
    assert f"{200 - before} captioned, 0 failed, {before} already in out.jsonl" in result.stderr


def test_resume_repairs_a_partial_last_line_and_retries_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_noise_pngs(tmp_path / "imgs", 3)
    output = tmp_path / "out.jsonl"
    kept = {"path": "imgs/img0000.png", "caption": "kept caption", "score": -0.5}
    foreign = {"path": "elsewhere/not-an-input.jpg", "error": {"code": "empty", "message": "was empty"}}
    failed = {"path": "imgs/img0001.png", "error": {"code": "unreadable", "message": "was missing"}}
    lines = [json.dumps(record) for record in (foreign, kept, failed)]
    output.write_text("\n".join(lines) + '\n{"path": "imgs/img0002.png", "capti', encoding="utf-8")

    result = run_cli(["caption", "imgs", "--model", str(tiny_model_dir), "--output", "out.jsonl", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "repairing" in result.stderr
    records = jsonl_records(output)
    assert records[:2] == [foreign, kept]  # untouched: not an input / already captioned
    assert sorted(record["path"] for record in records[2:]) == ["imgs/img0001.png", "imgs/img0002.png"]
    assert all("caption" in record for record in records[2:])  # the error was retried and replaced


def test_csv_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_noise_pngs(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    result = run_cli(["caption", "imgs", "--model", str(tiny_model_dir), "--output", "out.csv", *FAST], tmp_path)
    assert result.returncode == 1, result.stderr
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
    assert reader.fieldnames == ["path", "caption", "score", "error"]
    assert [row["path"] for row in rows] == ["imgs/broken.png", "imgs/img0000.png", "imgs/img0001.png"]
    assert rows[0]["caption"] == rows[0]["score"] == "" and rows[0]["error"].startswith("not_an_image: ")
    for row in rows[1:]:
        assert row["caption"] and row["error"] == ""
        float(row["score"])


def test_stdout_mode_with_a_progress_bar_on_a_terminal(tmp_path: Path, tiny_model_dir: Path) -> None:
    expected = write_noise_pngs(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [*CLI, "caption", "imgs", "--model", str(tiny_model_dir), *FAST],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    shown = bytearray()

    def drain() -> None:  # the terminal's buffer is small: keep reading while the run goes on
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO once the process has closed the terminal
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = process.communicate(timeout=TIMEOUT)
    reader.join(timeout=30)
    os.close(controller)
    terminal_text = shown.decode("utf-8", "replace")

    assert process.returncode == 1, terminal_text
    lines = stdout.splitlines()
    assert {line.split("\t")[0] for line in lines} == expected and len(lines) == len(expected)
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)
    assert "imgs/empty.jpg: empty:" in terminal_text  # errors go to stderr
    assert "img/s" in terminal_text and "\r" in terminal_text  # tqdm's bar with its rate


def test_shards_split_the_inputs_without_overlap(tmp_path: Path, tiny_model_dir: Path) -> None:
    expected = write_noise_pngs(tmp_path / "imgs", 12, size=16)
    common = ["caption", "imgs", "--model", str(tiny_model_dir), *FAST]
    results = run_side_by_side(
        [[*CLI, *common, "--shard", f"{i}/3", "--output", f"shard{i}.jsonl"] for i in range(3)], tmp_path
    )
    shards = []
    for i, result in enumerate(results):
        assert result.returncode == 0, result.stderr
        shards.append({record["path"] for record in jsonl_records(tmp_path / f"shard{i}.jsonl")})
        assert shards[i] == set(select_shard(sorted(expected), i, 3))  # the documented hash decides
    assert set.union(*shards) == expected
    assert sum(len(shard) for shard in shards) == len(expected)


def test_no_repeat_ngram_size_from_the_command_line_or_the_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_noise_pngs(tmp_path / "imgs", 3)
    tuned = tmp_path / "tuned"  # the same weights, with an n-gram ban of its own
    shutil.copytree(tiny_model_dir, tuned)
    metadata = json.loads((tuned / "model.json").read_text())
    metadata["decoding"] = {"no_repeat_ngram_size": 2}
    (tuned / "model.json").write_text(json.dumps(metadata))
    common = ["caption", "imgs", "--beam-size", "1", "--max-length", "20", "--workers", "1"]
    runs = {
        "plain": ["--model", str(tiny_model_dir)],
        "banned": ["--model", str(tiny_model_dir), "--no-repeat-ngram-size", "2"],
        "model's": ["--model", "tuned"],
        "model's, turned off": ["--model", "tuned", "--no-repeat-ngram-size", "0"],
    }
    results = run_side_by_side(
        [[*CLI, *common, *extra, "--output", f"{i}.jsonl"] for i, extra in enumerate(runs.values())], tmp_path
    )
    captions = {}
    for i, (name, result) in enumerate(zip(runs, results, strict=True)):
        assert result.returncode == 0, (name, result.stderr)
        captions[name] = {
            record["path"]: record["caption"].split() for record in jsonl_records(tmp_path / f"{i}.jsonl")
        }
        assert len(captions[name]) == 3
    assert all(repeated_bigrams(words) > 0 for words in captions["plain"].values()), "the test needs repeats"
    assert all(repeated_bigrams(words) == 0 for words in captions["banned"].values()), captions["banned"]
    assert captions["banned"] != captions["plain"]
    assert captions["model's"] == captions["banned"], "the model's own setting applies when none is given"
    assert captions["model's, turned off"] == captions["plain"], "an explicit 0 overrides the model's setting"


def test_console_script_and_info(tmp_path: Path, tiny_model_dir: Path) -> None:
    scored = tmp_path / "scored"
    shutil.copytree(tiny_model_dir, scored)
    metadata = json.loads((scored / "model.json").read_text())
    metadata["metrics"] = {"flickr8k_test": {"BLEU-4": 0.2134, "CIDEr": 0.5561}}
    metadata["decoding"] = {"no_repeat_ngram_size": 3}
    (scored / "model.json").write_text(json.dumps(metadata))
    script = Path(sys.executable).parent / "captioner"
    assert script.is_file(), f"the console script {script} is missing: pip install -e ."

    helped, text, as_json = run_side_by_side(
        [[str(script), "--help"], [*CLI, "info", "--model", "scored"], [*CLI, "info", "--model", "scored", "--json"]],
        tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    for mention in ("caption", "info", "serve", "python -m service", "exit status", "model could not be loaded"):
        assert mention in helped.stdout

    info = read_info(scored)
    grid = grid_size_for(info.config.encoder)
    assert text.returncode == 0, text.stderr
    for fact in (info.name, info.config.encoder.backbone, f"{grid}x{grid}", f"{len(info.vocabulary)} tokens"):
        assert fact in text.stdout
    assert "BLEU-4: 0.2134" in text.stdout and info.provenance["data"] in text.stdout
    assert "decoding:       no_repeat_ngram_size 3" in text.stdout

    assert as_json.returncode == 0, as_json.stderr
    described = json.loads(as_json.stdout)
    assert described["name"] == info.name and described["version"] == info.version
    assert described["grid_size"] == grid and described["vocabulary_size"] == len(info.vocabulary)
    assert described["decoder"]["hidden_dim"] == info.config.decoder.hidden_dim
    assert described["metrics"] == metadata["metrics"] and described["training_data"] == info.provenance["data"]
    assert described["decoding"] == {"no_repeat_ngram_size": 3}


def test_a_missing_model_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: exit statuses reach the shell through sys.exit(main()), which the runs above exercise.
    Image.fromarray(noise(16, 16, 0)).save(tmp_path / "one.png")
    monkeypatch.chdir(tmp_path)
    for args in (["info", "--model", "no-such-model"], ["caption", "one.png", "--model", "no-such-model"]):
        status, stderr = run_in_process(args, capsys)
        assert status == 3, stderr
        assert "no-such-model" in stderr and len(stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_noise_pngs(tmp_path / "imgs", 1)
    (tmp_path / "foreign.jsonl").write_text('{"name": "someone else\'s data"}\n')
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(tiny_model_dir)]
    cases = [
        ([], "usage"),
        (["frobnicate"], "invalid choice"),
        (["caption"], "PATH"),
        (["caption", "nowhere.jpg", *model], "no such file"),
        (["caption", "imgs/*.gif", *model], "no file matches"),
        (["caption", "imgs", "--beam-size", "0", *model], "beam_size"),
        (["caption", "imgs", "--temperature", "0.5", *model], "--sample"),
        (["caption", "imgs", "--repetition-penalty", "0.5", *model], "repetition_penalty"),
        (["caption", "imgs", "--no-repeat-ngram-size", "-1", *model], "no_repeat_ngram_size"),
        (["caption", "imgs", "--no-repeat-ngram-size", "two", *model], "invalid int value"),
        (["caption", "imgs", "--output", "out.txt", *model], ".jsonl or .csv"),
        (["caption", "imgs", "--beam-size", "2", "--n-best", "2", *model], "--n-best"),
        (["caption", "imgs", "--batch-size", "0", *model], "--batch-size"),
        (["caption", "imgs", "--shard", "3/3", *model], "out of range"),
        (["caption", "imgs", "--shard", "one/3", *model], "--shard"),
        (["caption", "imgs", "--output", "foreign.jsonl", *model], "refusing"),
    ]
    for args, message in cases:
        status, stderr = run_in_process(args, capsys)
        assert status == 2, (args, stderr)
        assert message in stderr, (args, stderr)
    assert (tmp_path / "foreign.jsonl").read_text() == '{"name": "someone else\'s data"}\n'  # left untouched
    assert not (tmp_path / "out.txt").exists()


def test_bad_repetition_options_are_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_noise_pngs(tmp_path / "imgs", 1)
    monkeypatch.chdir(tmp_path)
    missing = ["--model", "no-such-model"]  # loading it would exit 3
    for option, message in (
        (["--repetition-penalty", "0.5"], "repetition_penalty"),
        (["--length-penalty", "-1"], "length_penalty"),
        (["--no-repeat-ngram-size", "11"], "no_repeat_ngram_size"),
    ):
        status, stderr = run_in_process(["caption", "imgs", *option, *missing], capsys)
        assert status == 2 and message in stderr and "no-such-model" not in stderr, stderr
    status, stderr = run_in_process(["caption", "imgs", "--no-repeat-ngram-size", "2", *missing], capsys)
    assert status == 3, "a good value goes on to load the model"


def test_cuda_asked_for_but_absent_exits_2(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so --device cuda is not an error here")
    write_noise_pngs(tmp_path / "imgs", 1)
    monkeypatch.chdir(tmp_path)
    status, stderr = run_in_process(["caption", "imgs", "--device", "cuda", "--model", str(tiny_model_dir)], capsys)
    assert status == 2 and "cuda" in stderr.lower()


def test_serve_hands_every_argument_to_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_execv(program: str, argv: list[str]) -> None:
        calls.append((program, argv))
        raise SystemExit(0)  # execv never returns

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--bind", "0.0.0.0:8000", "--help"])
    assert calls == [(sys.executable, [sys.executable, "-m", "service", "--bind", "0.0.0.0:8000", "--help"])]


# ----------------------------------------------------------------------------- batch machinery in-process


def test_inputs_are_listed_sorted_deduplicated_and_filtered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = write_photos(tmp_path / "photos")
    (tmp_path / "photos" / ".cache").mkdir()
    (tmp_path / "photos" / ".cache" / "thumb.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "a[1].jpg")
    monkeypatch.chdir(tmp_path)

    listed = list_inputs(["photos"])
    assert listed == sorted(good | set(bad))
    assert list_inputs(["photos"], recursive=True) == sorted(good | set(bad) | {"photos/sub/inner.png"})
    assert list_inputs(["photos/*.png"]) == sorted(p for p in good | set(bad) if p.endswith(".png"))
    assert list_inputs(["photos/**/inner.png"]) == ["photos/sub/inner.png"]
    # The same file through several spellings and arguments counts once.
    assert list_inputs(["./photos/rgb.png", "photos//rgb.png", "photos/rgb.png", str(tmp_path / "photos/rgb.png")]) == [
        min("photos/rgb.png", str(tmp_path / "photos/rgb.png"))
    ]
    assert list_inputs(["photos/notes.txt"]) == ["photos/notes.txt"]  # named files are taken as named
    assert list_inputs(["a[1].jpg"]) == ["a[1].jpg"]  # an existing name is never a pattern
    with pytest.raises(InputError, match="no such file"):
        list_inputs(["missing.jpg"])
    with pytest.raises(InputError, match="no file matches"):
        list_inputs(["photos/*.nothing"])


def test_shard_assignment_is_a_stable_hash_and_roughly_balanced() -> None:
    paths = [f"data/{i:05d}.jpg" for i in range(3000)]
    for path in paths[:50]:
        digest = hashlib.sha1(path.encode()).digest()
        assert shard_of(path, 7) == int.from_bytes(digest[:8], "big") % 7
    sizes = [len(select_shard(paths, index, 3)) for index in range(3)]
    assert sum(sizes) == 3000 and min(sizes) > 900


@pytest.mark.parametrize("text", ["", "3", "1/0", "3/3", "-1/3", "a/b", "1/2/3", "1.5/3", "/3"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_shard(text)


def test_good_shards_parse() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("6/7") == (6, 7)


def test_attention_file_names_are_unique() -> None:
    names = attention_file_names(["a/cat.jpg", "b/cat.png", "c/Cat.jpg", "d/dog.jpg", "e/cat-2.jpg"])
    assert names["a/cat.jpg"] == "cat.attention.png" and names["d/dog.jpg"] == "dog.attention.png"
    assert len({name.lower() for name in names.values()}) == 5


def test_jsonl_output_leaves_a_foreign_file_alone(tmp_path: Path) -> None:
    for content in ('{"id": 1}\n', "hello\nworld\n", '{"path": "a.jpg", "caption": "x", "score": 1}\nnot json\n{}\n'):
        target = tmp_path / "out.jsonl"
        target.write_text(content)
        output = JsonlOutput(target)
        with pytest.raises(InputError):
            output.resume({"a.jpg"})
        output.close()
        assert target.read_text() == content


def test_jsonl_output_cuts_the_zeros_a_crash_leaves(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    good = '{"path": "a.jpg", "caption": "a cat", "score": -1.0}\n'
    target.write_bytes(good.encode() + b"\0" * 40)
    output = JsonlOutput(target)
    assert output.resume({"a.jpg", "b.jpg"}) == {"a.jpg"}
    output.write([Record("b.jpg", "a dog", -2.0)])
    output.close()
    assert [record["path"] for record in jsonl_records(target)] == ["a.jpg", "b.jpg"]


def test_csv_output_repairs_a_partial_row_and_retries_errors(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    odd_path = 'odd, "quoted"\nname.jpg'  # commas, quotes and a newline survive the round trip
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(
        [["path", "caption", "score", "error"], [odd_path, "a cat", "-1.5", ""], ["b.jpg", "", "", "empty: x"]]
    )
    target.write_text(buffer.getvalue() + "c.jpg,a do", encoding="utf-8")

    output = CsvOutput(target)
    assert output.resume({odd_path, "b.jpg", "c.jpg"}) == {odd_path}
    output.write([Record("b.jpg", "a bird", -0.25), Record.failure("c.jpg", InputError("gone", code="unreadable"))])
    output.close()
    with target.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows == [
        ["path", "caption", "score", "error"],
        [odd_path, "a cat", "-1.5", ""],
        ["b.jpg", "a bird", "-0.25", ""],
        ["c.jpg", "", "", "unreadable: gone"],
    ]


def test_an_output_file_cannot_be_shared_by_two_runs(tmp_path: Path) -> None:
    first, second = JsonlOutput(tmp_path / "out.jsonl"), JsonlOutput(tmp_path / "out.jsonl")
    first.resume(set())
    with pytest.raises(InputError, match="another captioner run"):
        second.resume(set())
    first.close()
    second.resume(set())
    second.close()


@pytest.mark.parametrize("workers", [1, 3])
def test_background_decoding_writes_the_records_of_decoding_in_place(
    tmp_path: Path, tiny_model_dir: Path, workers: int
) -> None:
    write_photos(tmp_path / "photos")
    paths = list_inputs([str(tmp_path / "photos")])
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu")
    options = captioner.search_options(beam_size=1, max_length=3)

    def records_file(workers: int) -> bytes:
        path = tmp_path / f"records-{workers}.jsonl"
        output = JsonlOutput(path)
        output.resume(set(paths))
        with open(os.devnull, "w") as quiet:
            summary = run_batches(
                paths,
                decode=cli._decoder(captioner, keep_image=False),
                caption_batch=cli._batch_captioner(captioner, options, None, {}, None, {}),
                output=output,
                batch_size=3,  # failures fall between and within batches
                workers=workers,
                progress=Progress(len(paths), quiet),
            )
        output.close()
        assert (summary.captioned, summary.failed) == (len(paths) - 4, 4)
        return path.read_bytes()

    in_place = records_file(0)
    records = [json.loads(line) for line in in_place.splitlines()]
    assert [record["path"] for record in records] == paths  # input order
    codes = {Path(r["path"]).name: r["error"]["code"] for r in records if "error" in r}
    assert codes == {
        "truncated.jpg": "truncated",
        "zero.jpg": "empty",
        "text.jpg": "not_an_image",
        "huge.png": "too_many_pixels",
    }
    assert records_file(workers) == in_place


def test_a_seed_samples_each_image_alike_whatever_the_batch_size_or_shard(tmp_path: Path, tiny_model_dir: Path) -> None:
    write_noise_pngs(tmp_path / "imgs", 6, size=16)
    sampling = ["caption", "imgs", "--model", str(tiny_model_dir), "--sample", "--temperature", "3", "--seed", "4"]
    sampling += ["--max-length", "8", "--workers", "2", "--n-best", "2"]
    results = run_side_by_side(
        [
            [*CLI, *sampling, "--batch-size", "4", "--output", "batch4.jsonl"],
            [*CLI, *sampling, "--batch-size", "1", "--output", "batch1.jsonl"],
            [*CLI, *sampling, "--batch-size", "4", "--shard", "1/2", "--output", "shard.jsonl"],
        ],
        tmp_path,
    )
    assert all(result.returncode == 0 for result in results), [result.stderr for result in results]

    def samples(name: str) -> dict[str, list[str]]:
        return {r["path"]: [c["caption"] for c in r["n_best"]] for r in jsonl_records(tmp_path / name)}

    by_path = samples("batch4.jsonl")
    assert samples("batch1.jsonl") == by_path
    shard = samples("shard.jsonl")
    assert shard and len(shard) < len(by_path)
    assert shard == {path: by_path[path] for path in shard}
    assert len({tuple(captions) for captions in by_path.values()}) > 1
