"""The Ray engine (``captioner caption --engine ray``, ``captioner.distributed``) and the Parquet output.

One local Ray (2 CPUs) serves the whole module: the in-process runs use it directly and the CLI's
subprocesses join it with ``--ray-address``, so the module starts Ray once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from captioner import cli
from captioner.batch import InputError, Record
from captioner.distributed import RayPlan, require_ray
from captioner.errors import OptionError
from tests.test_cli import CLI, complete_lines, encoded, jsonl_records, noise, png_claiming, write_noise_pngs

TIMEOUT = 300
BAD_FILES = {
    "truncated.jpg": "truncated",
    "zero.jpg": "empty",
    "text.jpg": "not_an_image",
    "huge.png": "too_many_pixels",
}
SEARCH = ["--beam-size", "2", "--max-length", "4", "--batch-size", "8"]


def needs_ray() -> None:
    pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install "captioner[ray]")')


def needs_pyarrow() -> None:
    pytest.importorskip("pyarrow.parquet", reason='pyarrow is not installed (pip install "captioner[ray]")')


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray for the module; yields the address other drivers join it at."""
    needs_ray()
    import ray

    context = ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 2**20)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def write_archive(folder: Path, good: int) -> dict[str, str | None]:
    """``good`` small noise PNGs plus the four kinds of bad file; path (as the CLI reports it) -> error code."""
    expected: dict[str, str | None] = dict.fromkeys(write_noise_pngs(folder, good))
    good_jpeg = encoded(Image.fromarray(noise(64, 64, 13)), "JPEG", quality=90)
    contents = {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is not a picture\n",
        "huge.png": png_claiming(60000, 60000),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        expected[f"{folder.name}/{name}"] = BAD_FILES[name]
    return expected


def parquet_records(folder: Path) -> list[Record]:
    import pyarrow.parquet as pq

    from captioner.parquet_output import records_from_table

    return [record for part in sorted(folder.glob("*.parquet")) for record in records_from_table(pq.read_table(part))]


# ------------------------------------------------------------------------------------------------ engine


def test_ray_engine_writes_the_local_engines_records(
    ray_address: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    expected = write_archive(tmp_path / "archive", 116)
    assert len(expected) == 120
    monkeypatch.chdir(tmp_path)
    common = ["caption", "archive", "--model", str(tiny_model_dir), *SEARCH, "--n-best", "2"]
    assert cli.main([*common, "--output", "local.jsonl"]) == cli.EXIT_IMAGES_FAILED
    # In this process Ray is already connected: the engine uses the module's session.
    assert cli.main([*common, "--output", "ray/*.parquet", "--engine", "ray", "--actors", "1"]) == 1
    assert "116 captioned, 4 failed" in capsys.readouterr().err

    local = {record["path"]: record for record in jsonl_records(tmp_path / "local.jsonl")}
    distributed = parquet_records(tmp_path / "ray")
    assert sorted(record.path for record in distributed) == sorted(expected)  # one record per input
    for record in distributed:
        mine = local[record.path]
        if expected[record.path] is not None:
            assert record.error_code == mine["error"]["code"] == expected[record.path]
            assert record.error_message == mine["error"]["message"] and record.caption is None
            continue
        assert record.caption == mine["caption"], record.path
        assert record.score == pytest.approx(mine["score"], abs=1e-4)  # batches differ: float sums may
        assert [c for c, _ in record.n_best] == [alternative["caption"] for alternative in mine["n_best"]]


def test_a_killed_ray_driver_is_resumed_with_one_record_per_input(
    ray_address: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    expected = write_noise_pngs(tmp_path / "many", 160)
    output = tmp_path / "out.jsonl"
    args = [*CLI, "caption", "many", "--model", str(tiny_model_dir), "--output", "out.jsonl", "--engine", "ray"]
    args += ["--ray-address", ray_address, "--beam-size", "1", "--max-length", "2", "--batch-size", "8"]
    driver = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while complete_lines(output) < 16:
        assert driver.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no records appeared"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    before = complete_lines(output)
    assert 16 <= before < 160

    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    paths = [record["path"] for record in jsonl_records(output)]
    assert len(paths) == len(set(paths)) == 160 and set(paths) == expected
    assert f"{160 - before} captioned, 0 failed, {before} already in out.jsonl" in result.stderr


def test_caption_dataset_takes_ray_datasets_and_uris(ray_address: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    import ray

    from captioner.api import Captioner
    from captioner.distributed import caption_dataset, records_of

    expected = write_archive(tmp_path / "few", 3)
    search = {"beam_size": 1, "max_length": 4}
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu")
    truth = {
        path: captioner.caption(str(tmp_path / path), **search).caption for path, code in expected.items() if not code
    }

    read = ray.data.read_binary_files(str(tmp_path / "few"), include_paths=True)
    uris = [(tmp_path / path).as_uri() for path in expected] + [(tmp_path / "missing.png").as_uri()]
    for source in (read, uris):
        dataset = caption_dataset(source, tiny_model_dir, search=search, plan=RayPlan(batch_size=2, actors=1))
        records = [record for batch in dataset.iter_batches(batch_format="pyarrow") for record in records_of(batch)]
        by_name = {Path(record.path).name: record for record in records}
        assert len(records) == len(by_name) == len(expected) + (source is uris)
        for path, code in expected.items():
            record = by_name[Path(path).name]
            assert (record.error_code, record.caption if record.ok else None) == (code, truth.get(path)), record
        if source is uris:
            assert by_name["missing.png"].error_code == "unreadable"


# ----------------------------------------------------------------------------------------- without Ray


def test_without_ray_the_engine_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes ``import ray`` fail
    with pytest.raises(OptionError, match=r'pip install "captioner\[ray\]"'):
        require_ray()
    write_noise_pngs(tmp_path / "imgs", 2)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["caption", "imgs", "--model", str(tiny_model_dir), "--output", "o.jsonl", "--engine", "ray"])
    assert status == cli.EXIT_USAGE
    assert "captioner[ray]" in capsys.readouterr().err


def test_ray_plan_defaults_fit_the_cluster() -> None:
    assert RayPlan().resolve(cluster_cpus=2, cluster_gpus=0, node_cpus=2) == (1, 1.0)
    assert RayPlan().resolve(cluster_cpus=64, cluster_gpus=0, node_cpus=16) == (8, 7.0)  # 2 per node, 1 CPU each spare
    assert RayPlan(gpus_per_actor=1).resolve(cluster_cpus=32, cluster_gpus=4, node_cpus=8) == (4, 1.0)
    assert RayPlan(gpus_per_actor=0.5, actors=3).resolve(cluster_cpus=8, cluster_gpus=2, node_cpus=8) == (3, 1.0)
    with pytest.raises(OptionError, match="GPUs"):
        RayPlan(gpus_per_actor=1).resolve(cluster_cpus=8, cluster_gpus=0, node_cpus=8)


# ------------------------------------------------------------------------------------------ Parquet output


def test_parquet_output_resumes_by_path_and_retries_errors(tmp_path: Path) -> None:
    needs_pyarrow()
    from captioner.parquet_output import ParquetOutput

    folder = tmp_path / "out"
    first = ParquetOutput(folder, rows_per_part=2)
    assert first.resume({"a", "b", "c"}) == set()
    first.write([Record("a", "a caption", -1.0, [("a caption", -1.0), ("other", -2.0)])])
    first.write([Record("b", error_code="empty", error_message="the file is empty")])  # a part of 2 rows
    first.write([Record("elsewhere", error_code="empty", error_message="not an input")])
    first.close()  # the last, partial part
    (folder / ".part-killed.parquet").write_bytes(b"PAR1 half")  # what a kill during a write leaves
    assert len([part for part in folder.glob("part-*.parquet")]) == 2

    second = ParquetOutput(folder)
    assert second.resume({"a", "b", "c"}) == {"a"}  # captioned: skipped; b's error: retried
    second.write([Record("b", "b caption", -0.5), Record("c", "c caption", -0.25)])
    second.close()
    records = {record.path: record for record in parquet_records(folder)}
    assert sorted(records) == ["a", "b", "c", "elsewhere"]
    assert records["a"].n_best == [("a caption", -1.0), ("other", -2.0)] and records["b"].caption == "b caption"
    assert records["elsewhere"].error_code == "empty"  # not an input of the run: kept
    assert not list(folder.glob(".part-*"))

    (folder / "foreign.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="refusing"):
        ParquetOutput(folder).resume({"a"})


def test_the_local_engine_writes_parquet_too(tmp_path: Path, tiny_model_dir: Path) -> None:
    needs_pyarrow()
    write_noise_pngs(tmp_path / "imgs", 5)
    args = [*CLI, "caption", "imgs", "--model", str(tiny_model_dir), "--output", "out/*.parquet", *SEARCH]
    for run in range(2):
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert ("5 captioned" if run == 0 else "0 captioned, 0 failed, 5 already in") in result.stderr
    assert sorted(record.path for record in parquet_records(tmp_path / "out")) == [
        f"imgs/img{i:04d}.png" for i in range(5)
    ]


def test_a_seed_samples_each_image_as_the_local_engine_does(
    ray_address: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_noise_pngs(tmp_path / "imgs", 12, size=16)
    monkeypatch.chdir(tmp_path)
    common = ["caption", "imgs", "--model", str(tiny_model_dir), "--sample", "--temperature", "3", "--seed", "7"]
    common += ["--max-length", "6", "--n-best", "2", "--batch-size", "5"]
    assert cli.main([*common, "--output", "local.jsonl"]) == cli.EXIT_OK
    assert cli.main([*common, "--output", "ray.jsonl", "--engine", "ray", "--actors", "1"]) == cli.EXIT_OK

    def samples(name: str) -> dict[str, list[str]]:
        return {r["path"]: [c["caption"] for c in r["n_best"]] for r in jsonl_records(tmp_path / name)}

    local = samples("local.jsonl")
    assert samples("ray.jsonl") == local and len(local) == 12
    assert len({tuple(captions) for captions in local.values()}) > 1  # the images' own draws, not one shared


def test_the_cli_lists_and_reads_uri_folders_on_ray(
    ray_address: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    write_noise_pngs(tmp_path / "imgs", 5, size=16)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    common = ["caption", "--model", str(tiny_model_dir), *SEARCH]
    assert cli.main([*common, "imgs", "--output", "local.jsonl"]) == cli.EXIT_OK
    uri = (tmp_path / "imgs").as_uri()
    assert cli.main([*common, uri, "--output", "local-uri.jsonl"]) == cli.EXIT_USAGE  # files only, locally
    assert "only --engine ray reads URIs" in capsys.readouterr().err
    assert cli.main([*common, uri, "--output", "ray.jsonl", "--engine", "ray", "--actors", "1"]) == cli.EXIT_OK
    local = {Path(r["path"]).name: r["caption"] for r in jsonl_records(tmp_path / "local.jsonl")}
    distributed = {r["path"]: r["caption"] for r in jsonl_records(tmp_path / "ray.jsonl")}
    assert all(path.startswith("file:///") for path in distributed) and len(distributed) == 5
    assert {path.rsplit("/", 1)[-1]: caption for path, caption in distributed.items()} == local
