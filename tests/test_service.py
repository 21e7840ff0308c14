"""The caption service through Flask's test client: parsing, validation, errors, auth, CORS, metrics, docs.

The real gunicorn server is exercised in test_service_server.py; these tests reach the corners of
the application directly and quickly, with one tiny model shared by every application.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from captioner import Captioner
from captioner.checkpoint import METADATA_FILE
from service import ServiceConfig, create_app
from service.__main__ import build_parser, environment, main
from service.config import ConfigError, ServerSettings
from service.memory import HeapTrimmer
from service.metrics import ServiceMetrics
from service.runtime import runtime_of
from tests.test_bench import load_bench

FAST = {"beam_size": "1", "max_length": "3"}
IMAGE_BENCH = load_bench("image_decode")  # the hostile files test_images.py decodes


def png(seed: int = 0, size: int = 64, flat: bool = False) -> bytes:
    """A noise image (distinct per seed), or a flat one that compresses to a few hundred bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:1, :1].repeat(size, 0).repeat(size, 1) if flat else pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return Captioner.from_pretrained(tiny_model_dir, device="cpu")


class Wrapped:
    """A captioner whose model call can be held or made to fail; everything else is the real one."""

    def __init__(self, inner: Captioner) -> None:
        self.inner = inner
        self.fail = False
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def caption_pixels(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.hold.wait(10)
        if self.fail:
            raise RuntimeError("simulated failure in /secret/path/model.py")
        return self.inner.caption_pixels(*args, **kwargs)


@pytest.fixture(scope="module")
def make_app(captioner: Captioner) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def build(model: Any = captioner, **settings: Any) -> Flask:
        app = create_app(ServiceConfig(**({"max_wait_ms": 0.0} | settings)), loader=lambda config: model)
        assert runtime_of(app).wait_ready(60)
        apps.append(app)
        return app

    yield build
    for app in apps:
        runtime_of(app).close(5)


@pytest.fixture(scope="module")
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app().test_client()


def repeated_bigrams(words: list[str]) -> int:
    bigrams = [tuple(words[i : i + 2]) for i in range(len(words) - 1)]
    return len(bigrams) - len(set(bigrams))


def error_of(response: Any) -> dict[str, str]:
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# --- configuration ---------------------------------------------------------------------------


def test_config_reads_every_variable_and_hides_the_key() -> None:
    config = ServiceConfig.from_env(
        {
            "CAPTIONER_MODEL_DIR": "/models/x",
            "CAPTIONER_DEVICE": "cpu",
            "CAPTIONER_MAX_BATCH_SIZE": "8",
            "CAPTIONER_MAX_WAIT_MS": "2.5",
            "CAPTIONER_QUEUE_SIZE": "100",
            "CAPTIONER_MAX_UPLOAD_BYTES": "2_000_000",
            "CAPTIONER_MAX_PIXELS": "1000000",
            "CAPTIONER_MAX_DECODE_BYTES": "64_000_000",
            "CAPTIONER_DECODE_CONCURRENCY": "3",
            "CAPTIONER_MAX_BEAM_SIZE": "5",
            "CAPTIONER_MAX_LENGTH": "30",
            "CAPTIONER_API_KEY": "s3cret-key",
            "CAPTIONER_CORS_ORIGINS": "https://a.example, http://b.example/",
            "CAPTIONER_METRICS_AUTH": "Open",
        }
    )
    assert (config.model_dir, config.device, config.max_batch_size, config.max_wait_ms) == ("/models/x", "cpu", 8, 2.5)
    assert (config.queue_size, config.max_upload_bytes, config.max_pixels) == (100, 2_000_000, 1_000_000)
    assert (config.max_decode_bytes, config.decode_concurrency, config.decode_slots) == (64_000_000, 3, 3)
    assert (config.max_beam_size, config.max_caption_length, config.api_key) == (5, 30, "s3cret-key")
    assert config.cors_origins == ("https://a.example", "http://b.example")
    assert config.metrics_auth == "open" and not config.metrics_need_key
    assert "s3cret-key" not in repr(config)
    assert ServiceConfig.from_env({}) == ServiceConfig()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CAPTIONER_MAX_BATCH_SIZE", "0"),
        ("CAPTIONER_MAX_BATCH_SIZE", "many"),
        ("CAPTIONER_MAX_WAIT_MS", "nan"),
        ("CAPTIONER_QUEUE_SIZE", "-3"),
        ("CAPTIONER_MAX_BEAM_SIZE", "51"),
        ("CAPTIONER_CORS_ORIGINS", "example.org"),
        ("CAPTIONER_METRICS_AUTH", "public"),
        ("CAPTIONER_MAX_DECODE_BYTES", "0"),
        ("CAPTIONER_MAX_DECODE_BYTES", "256MB"),
        ("CAPTIONER_DECODE_CONCURRENCY", "0"),
        ("CAPTIONER_DECODE_CONCURRENCY", "1025"),
        ("CAPTIONER_DECODE_CONCURRENCY", "two"),
    ],
)
def test_a_bad_variable_is_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        ServiceConfig.from_env({variable: value})


def test_decode_slots_default_to_the_torch_threads_else_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    assert ServiceConfig().decode_slots == 6
    assert ServiceConfig(torch_threads=2).decode_slots == 2  # python -m service sets it to the worker's share
    assert ServiceConfig(torch_threads=2, decode_concurrency=5).decode_slots == 5


def test_server_settings_from_env() -> None:
    settings = ServerSettings.from_env({"CAPTIONER_HOST": "::1", "CAPTIONER_PORT": "9000", "CAPTIONER_THREADS": "4"})
    assert (settings.bind, settings.threads, settings.workers) == ("[::1]:9000", 4, 1)
    with pytest.raises(ConfigError, match="CAPTIONER_PORT"):
        ServerSettings.from_env({"CAPTIONER_PORT": "70000"})
    assert (settings.header_timeout_s, settings.body_timeout_s) == (10.0, 30.0)
    deadlines = ServerSettings.from_env({"CAPTIONER_HEADER_TIMEOUT_S": "2.5", "CAPTIONER_BODY_TIMEOUT_S": "90"})
    assert (deadlines.header_timeout_s, deadlines.body_timeout_s) == (2.5, 90.0)
    for variable, value in [("CAPTIONER_HEADER_TIMEOUT_S", "0"), ("CAPTIONER_BODY_TIMEOUT_S", "soon")]:
        with pytest.raises(ConfigError, match=variable):
            ServerSettings.from_env({variable: value})


def test_the_command_line_becomes_environment_variables() -> None:
    args = build_parser().parse_args(
        ["--host", "0.0.0.0", "--port", "9001", "--workers", "2", "--model", "m", "--max-batch-size", "8"]
    )
    env = environment(args, {"CAPTIONER_DEVICE": "cpu", "CAPTIONER_PORT": "1"})
    assert env["CAPTIONER_HOST"] == "0.0.0.0" and env["CAPTIONER_PORT"] == "9001"  # options win over the environment
    assert env["CAPTIONER_WORKERS"] == "2" and env["CAPTIONER_MAX_BATCH_SIZE"] == "8"
    assert Path(env["CAPTIONER_MODEL_DIR"]).is_absolute() and env["CAPTIONER_DEVICE"] == "cpu"
    assert "CAPTIONER_THREADS" not in env  # not given: gunicorn_config applies the default


def test_invalid_settings_stop_python_m_service_before_gunicorn_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "70000"]) == 2
    assert "CAPTIONER_PORT" in capsys.readouterr().err
    assert main(["--max-batch-size", "0"]) == 2
    assert "CAPTIONER_MAX_BATCH_SIZE" in capsys.readouterr().err


@pytest.mark.parametrize(("cores", "workers", "threads"), [(8, 1, "8"), (8, 3, "2"), (2, 4, "1")])
def test_each_worker_gets_its_share_of_the_cores_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, threads: str
) -> None:
    started: list[dict[str, str]] = []
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr("os.execve", lambda path, argv, env: started.append(env))
    monkeypatch.delenv("CAPTIONER_TORCH_THREADS", raising=False)
    main(["--workers", str(workers)])
    assert started[-1]["CAPTIONER_TORCH_THREADS"] == threads
    monkeypatch.setenv("CAPTIONER_TORCH_THREADS", "5")
    main(["--workers", str(workers)])
    assert started[-1]["CAPTIONER_TORCH_THREADS"] == "5"


# --- readiness -------------------------------------------------------------------------------


def test_readyz_is_503_until_the_model_is_loaded_while_healthz_answers(captioner: Captioner) -> None:
    release = threading.Event()

    def slow_loader(config: ServiceConfig) -> Captioner:
        release.wait(30)
        return captioner

    app = create_app(ServiceConfig(), loader=slow_loader)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    loading = client.get("/readyz")
    assert loading.status_code == 503 and loading.get_json()["status"] == "loading"
    early = client.post("/predict", data=png(), content_type="image/png")
    assert early.status_code == 503 and error_of(early)["code"] == "model_loading" and early.headers["Retry-After"]
    release.set()
    assert runtime_of(app).wait_ready(60)
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", data=png(), content_type="image/png", query_string=FAST).status_code == 200
    runtime_of(app).close(5)


def test_a_model_that_fails_to_load_keeps_readyz_503_and_says_nothing_internal(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    missing = tmp_path / "no-such-model"
    app = create_app(ServiceConfig(model_dir=str(missing)), on_load_failure=failures.append)
    runtime = runtime_of(app)
    deadline = time.monotonic() + 60
    while not runtime.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.failed and len(failures) == 1
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["status"] == "failed"
    response = client.post("/predict", data=png(), content_type="image/png")
    assert response.status_code == 503 and error_of(response)["code"] == "model_unavailable"
    assert str(tmp_path) not in response.get_data(as_text=True) + ready.get_data(as_text=True)


# --- the three ways to send an image ---------------------------------------------------------


def test_every_input_form_gives_the_python_api_caption(client: FlaskClient, captioner: Captioner) -> None:
    first, second = png(1), png(2)
    expected = [captioner.caption(image) for image in (first, second)]  # defaults: beam 3, max_length 20
    multipart = client.post("/predict", data={"image": [(io.BytesIO(first), "a.png"), (io.BytesIO(second), "b.png")]})
    raw = client.post("/predict", data=second, content_type="image/png")
    encoded = [base64.b64encode(image).decode() for image in (first, second)]
    as_json = client.post("/predict", json={"images": encoded})
    data_url = client.post(
        "/predict", json={"image": "data:image/png;base64," + base64.urlsafe_b64encode(first).decode()}
    )
    for response in (multipart, raw, as_json, data_url):
        assert response.status_code == 200, response.get_data(as_text=True)
    got = {
        "multipart": multipart.get_json()["results"],
        "json": as_json.get_json()["results"],
    }
    for results in got.values():
        assert [r["captions"][0]["caption"] for r in results] == [e.caption for e in expected]
        assert [r["captions"][0]["score"] for r in results] == pytest.approx([e.score for e in expected], abs=1e-4)
    assert raw.get_json()["results"][0]["captions"][0]["caption"] == expected[1].caption
    assert data_url.get_json()["results"][0]["captions"][0]["caption"] == expected[0].caption
    body = raw.get_json()
    assert body["model"] == {"name": captioner.info.name, "version": captioner.info.version}
    assert body["timing_ms"] > 0
    assert "words" not in body["results"][0]


def test_n_best_and_attention(client: FlaskClient, captioner: Captioner) -> None:
    image = png(3)
    expected = captioner.caption(image, beam_size=4, max_length=6, n_best=3)
    response = client.post(
        "/predict",
        data={"image": (io.BytesIO(image), "x.png"), "beam_size": "4", "max_length": "6", "n_best": "3"}
        | {"attention": "true"},
    )
    assert response.status_code == 200
    result = response.get_json()["results"][0]
    assert [c["caption"] for c in result["captions"]] == [c.caption for c in expected.n_best]
    assert len(result["captions"]) == 3
    g = captioner.grid_size
    assert result["grid_size"] == g and result["words"] == expected.words
    attention = np.array(result["attention"])
    assert attention.shape == (len(expected.words), g, g)
    assert np.allclose(attention, expected.attention, atol=1e-4)
    assert np.allclose(attention, np.round(attention, 4))  # rounded to 4 decimals
    assert np.allclose(attention.sum(axis=(1, 2)), 1.0, atol=g * g * 1e-4)


def test_repetition_options_as_form_fields_and_json(client: FlaskClient, captioner: Captioner) -> None:
    image = png(4)
    plain = captioner.caption(image, beam_size=1, max_length=20)
    assert repeated_bigrams(plain.words) > 0, "the test needs a caption that repeats bigrams"
    form = client.post(
        "/predict",
        data={"image": (io.BytesIO(image), "x.png"), "beam_size": "1", "max_length": "20"}
        | {"no_repeat_ngram_size": "2", "repetition_penalty": "1.0"},
    )
    assert form.status_code == 200, form.get_data(as_text=True)
    words = form.get_json()["results"][0]["captions"][0]["caption"].split()
    assert (
        repeated_bigrams(words) == 0
        and words == captioner.caption(image, max_length=20, beam_size=1, no_repeat_ngram_size=2).words
    )
    encoded = base64.b64encode(image).decode()
    document = {
        "image": encoded,
        "beam_size": 1,
        "max_length": 20,
        "no_repeat_ngram_size": 3,
        "repetition_penalty": 1.5,
    }
    as_json = client.post("/predict", json=document)
    assert as_json.status_code == 200, as_json.get_data(as_text=True)
    expected = captioner.caption(image, beam_size=1, max_length=20, no_repeat_ngram_size=3, repetition_penalty=1.5)
    assert as_json.get_json()["results"][0]["captions"][0]["caption"] == expected.caption != plain.caption


def test_the_models_own_decoding_applies_when_the_request_leaves_it_out(
    make_app: Callable[..., Flask], tiny_model_dir: Path, captioner: Captioner, tmp_path: Path
) -> None:
    tuned_dir = tmp_path / "tuned"  # the same weights, with an n-gram ban of its own
    shutil.copytree(tiny_model_dir, tuned_dir)
    metadata = json.loads((tuned_dir / METADATA_FILE).read_text())
    metadata["decoding"] = {"no_repeat_ngram_size": 2}
    (tuned_dir / METADATA_FILE).write_text(json.dumps(metadata))
    client = make_app(Captioner.from_pretrained(tuned_dir, device="cpu")).test_client()
    image = png(5)
    plain = captioner.caption(image, beam_size=1, max_length=20)
    assert repeated_bigrams(plain.words) > 0, "the test needs a caption that repeats bigrams"

    def caption(**options: Any) -> str:
        response = client.post("/predict", json={"image": base64.b64encode(image).decode(), **options})
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()["results"][0]["captions"][0]["caption"]

    default = caption(beam_size=1, max_length=20)
    assert repeated_bigrams(default.split()) == 0
    assert default == captioner.caption(image, beam_size=1, max_length=20, no_repeat_ngram_size=2).caption
    assert caption(beam_size=1, max_length=20, no_repeat_ngram_size=0) == plain.caption, "the request's 0 wins"


def test_options_may_come_from_the_query_string_of_a_raw_body(client: FlaskClient) -> None:
    response = client.post("/predict", data=png(), content_type="image/jpeg", query_string={"n_best": "2"})
    # The Content-Type says JPEG but the bytes are PNG: the decoder trusts the bytes, not the label.
    assert response.status_code == 200 and len(response.get_json()["results"][0]["captions"]) == 2


# --- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"beam_size": "0"}, "invalid_option"),
        ({"beam_size": "11"}, "invalid_option"),  # above the default limit of 10
        ({"beam_size": "three"}, "invalid_option"),
        ({"max_length": "51"}, "invalid_option"),
        ({"beam_size": "2", "n_best": "3"}, "invalid_option"),
        ({"attention": "maybe"}, "invalid_option"),
        ({"no_repeat_ngram_size": "-1"}, "invalid_option"),
        ({"no_repeat_ngram_size": "11"}, "invalid_option"),
        ({"no_repeat_ngram_size": "two"}, "invalid_option"),
        ({"repetition_penalty": "0.5"}, "invalid_option"),
        ({"repetition_penalty": "10.5"}, "invalid_option"),
        ({"repetition_penalty": "nan"}, "invalid_option"),
        ({"repetition_penalty": "strong"}, "invalid_option"),
        ({"beam": "3"}, "unknown_option"),
    ],
)
def test_bad_option_values_are_400(client: FlaskClient, options: dict[str, str], code: str) -> None:
    response = client.post("/predict", data={"image": (io.BytesIO(png()), "x.png")} | options)
    assert response.status_code == 400 and error_of(response)["code"] == code


@pytest.mark.parametrize(
    "document",
    [
        {"image": "x", "beam_size": True},
        {"image": "x", "beam_size": 2.5},
        {"image": "x", "attention": "sometimes"},
        {"image": "x", "max_length": [3]},
        {"image": "x", "no_repeat_ngram_size": 2.0},
        {"image": "x", "no_repeat_ngram_size": True},
        {"image": "x", "repetition_penalty": True},
        {"image": "x", "repetition_penalty": [1.5]},
        {"image": "x", "repetition_penalty": 0.99},
    ],
)
def test_json_options_must_have_the_right_type(client: FlaskClient, document: dict[str, Any]) -> None:
    document["image"] = base64.b64encode(png()).decode()
    response = client.post("/predict", json=document)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_option"


def test_repetition_options_are_named_when_refused(client: FlaskClient) -> None:
    for name, value in (("no_repeat_ngram_size", "-1"), ("repetition_penalty", "0.5")):
        response = client.post("/predict", data={"image": (io.BytesIO(png()), "x.png"), name: value})
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "invalid_option" and name in error["message"] and value in error["message"]


def test_an_option_given_twice_is_refused(client: FlaskClient) -> None:
    response = client.post(
        "/predict", data={"image": (io.BytesIO(png()), "x.png"), "beam_size": "2"}, query_string={"beam_size": "3"}
    )
    assert response.status_code == 400 and "2 times" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({}, 400, "missing_image"),
        ({"data": {"beam_size": "2"}, "content_type": "multipart/form-data"}, 400, "missing_image"),
        ({"data": {"image": (io.BytesIO(b""), "")}}, 400, "missing_image"),
        ({"data": {"image": "text, not a file"}, "content_type": "multipart/form-data"}, 400, "invalid_image_field"),
        ({"json": {"beam_size": 2}}, 400, "missing_image"),
        ({"json": {"image": "@@not base64@@"}}, 400, "invalid_base64"),
        ({"json": {"image": 12}}, 400, "invalid_base64"),
        ({"json": ["a", "list"]}, 400, "invalid_json"),
        ({"data": b"{not json", "content_type": "application/json"}, 400, "invalid_json"),
        ({"data": b"[" * 100_000 + b"]" * 100_000, "content_type": "application/json"}, 400, "invalid_json"),
        ({"data": b"hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"data": b"<svg/>", "content_type": "image/svg+xml"}, 415, "unsupported_media_type"),
        ({"data": b"x=1", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        ({"data": b"plain text, not an image", "content_type": "image/png"}, 422, "not_an_image"),
        ({"data": png()[:200], "content_type": "image/png"}, 422, "truncated"),
        ({"data": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "content_type": "image/png"}, 422, "undecodable"),
    ],
)
def test_each_bad_input_has_its_status_and_code(
    client: FlaskClient, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    assert error_of(response)["code"] == code
    assert client.post("/predict", data=png(), content_type="image/png", query_string=FAST).status_code == 200


def test_the_failing_image_of_several_is_named(client: FlaskClient) -> None:
    response = client.post(
        "/predict", data={"image": [(io.BytesIO(png()), "a.png"), (io.BytesIO(b"garbage"), "b.png")]}
    )
    assert response.status_code == 422 and error_of(response)["message"].startswith("image 2:")


LONG_INTEGER = "1" * 5000  # over Python's limit on digits for int(), which raises ValueError


@pytest.mark.parametrize(
    ("request_kwargs", "code"),
    [
        ({"json_text": f'{{"image": "IMAGE", "beam_size": {LONG_INTEGER}}}'}, "invalid_json"),
        ({"data": {"beam_size": LONG_INTEGER}}, "invalid_option"),
        ({"query_string": {"max_length": LONG_INTEGER}, "data": {}}, "invalid_option"),
    ],
    ids=["json-body", "form-field", "query-value"],
)
def test_an_integer_over_pythons_digit_limit_is_400(
    client: FlaskClient, caplog: pytest.LogCaptureFixture, request_kwargs: dict[str, Any], code: str
) -> None:
    image = png()
    if "json_text" in request_kwargs:
        text = request_kwargs.pop("json_text").replace("IMAGE", base64.b64encode(image).decode())
        request_kwargs |= {"data": text, "content_type": "application/json"}
    else:
        request_kwargs["data"] |= {"image": (io.BytesIO(image), "x.png")}
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert error_of(response)["code"] == code
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname == "ERROR"]


def tiny_parts(count: int, boundary: str = "b") -> bytes:
    """A multipart body of ``count`` one-byte text fields."""
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'.encode() for i in range(count)
    )
    return parts + f"--{boundary}--\r\n".encode()


def test_each_413_names_the_limit_it_hit(make_app: Callable[..., Flask]) -> None:
    client = make_app(max_upload_bytes=1_000_000).test_client()
    form_type = "multipart/form-data; boundary=b"
    many = tiny_parts(1500)
    assert 80_000 < len(many) < 90_000  # far below the body limit: only the count of parts is too high
    parts = client.post("/predict", data=many, content_type=form_type)
    assert parts.status_code == 413, parts.get_data(as_text=True)
    error = error_of(parts)
    assert error["code"] == "too_many_form_parts" and "1000" in error["message"] and "bytes" not in error["message"]
    # Exactly at the limit of parts is accepted as far as the form goes (then refused for its unknown options).
    assert client.post("/predict", data=tiny_parts(1000), content_type=form_type).status_code == 400

    memory = client.post("/predict", data={"image": (io.BytesIO(png()), "x.png"), "beam_size": "1" * 600_000})
    assert memory.status_code == 413
    error = error_of(memory)
    assert error["code"] == "form_field_too_large" and "500000 bytes" in error["message"]

    # A chunked form (no Content-Length to check up front) of one file over the body limit.
    head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    large = head + b"\0" * 1_100_000 + b"\r\n--b--\r\n"
    chunked = client.post(
        "/predict", input_stream=io.BytesIO(large), content_type=form_type,
        headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True},
    )  # fmt: skip
    assert chunked.status_code == 413
    error = error_of(chunked)
    assert error["code"] == "payload_too_large" and "1000000 bytes" in error["message"]
    announced = client.post("/predict", data=b"\0" * 1_000_001, content_type="image/png")
    assert announced.status_code == 413 and "1000000 bytes" in error_of(announced)["message"]


def test_size_limits(make_app: Callable[..., Flask]) -> None:
    client = make_app(max_upload_bytes=4096, max_pixels=1000, max_images=2).test_client()
    big = client.post("/predict", data=b"\0" * 5000, content_type="image/png")
    assert big.status_code == 413 and error_of(big)["code"] == "payload_too_large"
    too_many_pixels = client.post("/predict", data=png(size=40, flat=True), content_type="image/png")  # 1600 px
    assert too_many_pixels.status_code == 413 and error_of(too_many_pixels)["code"] == "too_many_pixels"
    small = png(size=8)
    three = client.post("/predict", data={"image": [(io.BytesIO(small), f"{i}.png") for i in range(3)]})
    assert three.status_code == 413 and error_of(three)["code"] == "too_many_images"
    assert client.post("/predict", data=small, content_type="image/png", query_string=FAST).status_code == 200


def test_limits_configured_lower_are_enforced(make_app: Callable[..., Flask]) -> None:
    client = make_app(max_beam_size=2, max_caption_length=5).test_client()
    assert client.post("/predict", data=png(), content_type="image/png").status_code == 200  # defaults are capped
    too_wide = client.post("/predict", data=png(), content_type="image/png", query_string={"beam_size": "3"})
    assert too_wide.status_code == 400 and "from 1 to 2" in error_of(too_wide)["message"]


def test_unknown_routes_and_methods(client: FlaskClient) -> None:
    missing = client.get("/no/such/thing")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]


# --- failures inside the service -------------------------------------------------------------


def test_a_lone_request_does_not_wait_out_the_batching_window(make_app: Callable[..., Flask]) -> None:
    """/predict announces itself to the batcher while it reads its image, so with nobody else on the
    way its batch runs at once, not after ``max_wait_ms`` (here 5 s)."""
    client = make_app(max_wait_ms=5000.0).test_client()
    started = time.monotonic()
    response = client.post("/predict", data=png(7), content_type="image/png", query_string=FAST)
    assert response.status_code == 200
    assert time.monotonic() - started < 4.0


def test_a_failing_batch_is_a_500_for_its_requests_and_the_next_one_succeeds(
    make_app: Callable[..., Flask], captioner: Captioner
) -> None:
    model = Wrapped(captioner)
    client = make_app(model).test_client()
    model.fail = True
    response = client.post("/predict", data=png(), content_type="image/png", query_string=FAST)
    assert response.status_code == 500 and error_of(response)["code"] == "captioning_failed"
    assert "secret" not in response.get_data(as_text=True)
    model.fail = False
    assert client.post("/predict", data=png(), content_type="image/png", query_string=FAST).status_code == 200


def test_an_unexpected_error_is_a_generic_500_without_internals(
    make_app: Callable[..., Flask], captioner: Captioner
) -> None:
    class Broken(Wrapped):
        def preprocess(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom in /secret/path/module.py line 12")

    client = make_app(Broken(captioner)).test_client()
    response = client.post("/predict", data=png(), content_type="image/png")
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "internal_error" and response.headers["X-Request-ID"] in error["message"]
    text = response.get_data(as_text=True)
    assert "secret" not in text and "Traceback" not in text and "boom" not in text


def test_a_full_queue_is_503_with_retry_after(make_app: Callable[..., Flask], captioner: Captioner) -> None:
    model = Wrapped(captioner)
    app = make_app(model, queue_size=2, max_images=2, max_batch_size=1)
    model.hold.clear()
    results: dict[str, int] = {}

    def send(name: str, count: int) -> None:
        data = {"image": [(io.BytesIO(png(i)), f"{i}.png") for i in range(count)]} | FAST
        results[name] = app.test_client().post("/predict", data=data).status_code

    model.entered.clear()
    running = threading.Thread(target=send, args=("running", 1))
    running.start()
    assert model.entered.wait(10)  # the batcher holds the first request in the model call
    waiting = threading.Thread(target=send, args=("waiting", 2))
    waiting.start()
    runtime = runtime_of(app)
    deadline = time.monotonic() + 10
    while runtime.batcher is not None and runtime.batcher.depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refused = app.test_client().post("/predict", data=png(), content_type="image/png", query_string=FAST)
    assert refused.status_code == 503 and error_of(refused)["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) >= 1
    model.hold.set()
    running.join(30)
    waiting.join(30)
    assert results == {"running": 200, "waiting": 200}


# --- decoding: its slots, its deadline, its memory --------------------------------------------


class CountingDecodes(Wrapped):
    """A captioner that counts the decodes started and the most running at once, each taking at least
    ``seconds`` (the real decode, then a sleep)."""

    def __init__(self, inner: Captioner, seconds: float = 0.0) -> None:
        super().__init__(inner)
        self.seconds = seconds
        self.started = 0
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def preprocess(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.started += 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            pixels = self.inner.preprocess(*args, **kwargs)
            time.sleep(self.seconds)
            return pixels
        finally:
            with self._lock:
                self.running -= 1

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.running == 0


@pytest.mark.parametrize("slots", [1, 3])
def test_no_more_images_are_decoded_at_once_than_the_decode_slots(
    make_app: Callable[..., Flask], captioner: Captioner, slots: int
) -> None:
    model = CountingDecodes(captioner, seconds=0.05)
    app = make_app(model, decode_concurrency=slots)
    statuses: list[int] = []

    def send(seed: int) -> None:
        data = {"image": [(io.BytesIO(png(seed * 4 + i, size=16)), f"{i}.png") for i in range(4)]} | FAST
        statuses.append(app.test_client().post("/predict", data=data).status_code)

    senders = [threading.Thread(target=send, args=(seed,)) for seed in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert statuses == [200] * 4
    assert model.started == 16
    assert model.most_running == slots  # as many as allowed side by side, never more


def test_a_request_over_its_deadline_is_503_at_the_deadline_and_its_waiting_decodes_are_dropped(
    make_app: Callable[..., Flask], captioner: Captioner
) -> None:
    # 16 grey PNGs of 35 megapixels and 16 bits: small uploads, costly to decode. Each decode is held
    # at least half a second more, so that however fast the machine, two slots cannot get through
    # more than four before the deadline, nor through all sixteen in less than four seconds.
    costly = IMAGE_BENCH.grey16_png(7000, 5000)
    assert len(costly) < 200_000
    model = CountingDecodes(captioner, seconds=0.5)
    app = make_app(model, request_timeout_s=1.0, decode_concurrency=2)
    data = {"image": [(io.BytesIO(costly), f"{i}.png") for i in range(16)]} | FAST
    started = time.monotonic()
    response = app.test_client().post("/predict", data=data)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.get_data(as_text=True)
    assert error_of(response)["code"] == "timeout" and response.headers["Retry-After"]
    assert elapsed < 4.0  # the 1 s deadline, with a wide margin for a busy machine
    model.wait_idle(30)  # the decodes already running when the deadline passed finish on their threads
    assert model.started <= 6  # the rest were never started
    ok = app.test_client().post("/predict", data=png(), content_type="image/png", query_string=FAST)
    assert ok.status_code == 200


def test_the_deadline_counts_from_the_start_of_the_request(
    make_app: Callable[..., Flask], captioner: Captioner
) -> None:
    # Each decode is slow (0.4 s) but well within the deadline on its own; a request of four, one slot,
    # is not: the waits for the slot count against the one deadline.
    model = CountingDecodes(captioner, seconds=0.4)
    client = make_app(model, request_timeout_s=1.0, decode_concurrency=1).test_client()
    one = client.post("/predict", data=png(), content_type="image/png", query_string=FAST)
    assert one.status_code == 200
    data = {"image": [(io.BytesIO(png(i)), f"{i}.png") for i in range(4)]} | FAST
    four = client.post("/predict", data=data)
    assert four.status_code == 503 and error_of(four)["code"] == "timeout"
    model.wait_idle(10)
    assert model.started <= 1 + 3  # the fourth image never started


def test_the_memory_budget_of_a_decode_is_configurable(make_app: Callable[..., Flask]) -> None:
    image = png(size=64)  # PIL holds it in 64 * 64 * 4 = 16,384 bytes
    tight = make_app(max_decode_bytes=16_383).test_client()
    refused = tight.post("/predict", data=image, content_type="image/png", query_string=FAST)
    assert refused.status_code == 413 and error_of(refused)["code"] == "too_costly"
    assert "16,383 bytes" in error_of(refused)["message"]
    enough = make_app(max_decode_bytes=16_384).test_client()
    assert enough.post("/predict", data=image, content_type="image/png", query_string=FAST).status_code == 200


def test_the_heap_trimmer_trims_only_when_malloc_holds_enough_freed_memory() -> None:
    trimmer = HeapTrimmer(threshold=0)
    if not trimmer.available:
        assert not trimmer.trim()  # not glibc: nothing to call, nothing done
        return
    assert trimmer.trim()
    held = trimmer.free_bytes()
    if held is not None:  # glibc 2.33 or later can say how much it holds
        assert not HeapTrimmer(threshold=held + 2**40).trim()


# --- security --------------------------------------------------------------------------------


def test_the_api_key_guards_predict_only(make_app: Callable[..., Flask]) -> None:
    client = make_app(api_key="correct horse").test_client()

    def predict(headers: dict[str, str]) -> Any:
        return client.post("/predict", data=png(), content_type="image/png", query_string=FAST, headers=headers)

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic correct horse"}):
        response = predict(headers)
        assert response.status_code == 401 and error_of(response)["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert predict({"Authorization": "Bearer correct horse"}).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_metrics_need_the_key_unless_open(make_app: Callable[..., Flask]) -> None:
    key = {"Authorization": "Bearer correct horse"}
    guarded = make_app(api_key="correct horse").test_client()
    refused = guarded.get("/metrics")
    assert refused.status_code == 401 and error_of(refused)["code"] == "unauthorized"
    assert guarded.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/metrics", headers=key).status_code == 200
    opened = make_app(api_key="correct horse", metrics_auth="open").test_client()
    assert opened.get("/metrics").status_code == 200
    assert opened.post("/predict", data=png(), content_type="image/png").status_code == 401  # /predict stays guarded
    assert make_app().test_client().get("/metrics").status_code == 200  # no key: nothing to ask for


def test_openapi_states_the_security_the_server_applies(make_app: Callable[..., Flask]) -> None:
    def operations(**settings: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        document = make_app(**settings).test_client().get("/openapi.json").get_json()
        found = {path: methods.get("post") or methods["get"] for path, methods in document["paths"].items()}
        return document, found

    document, open_ops = operations()
    assert "securitySchemes" not in document["components"] and "security" not in document
    assert not [path for path, op in open_ops.items() if "security" in op or "401" in op["responses"]]

    document, guarded = operations(api_key="k")
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    required = {path for path, op in guarded.items() if op.get("security") == [{"bearerAuth": []}]}
    assert required == {"/predict", "/metrics"}
    assert all("401" in guarded[path]["responses"] for path in required)
    assert not [path for path, op in guarded.items() if path not in required and "security" in op]

    _, metrics_open = operations(api_key="k", metrics_auth="open")
    assert {path for path, op in metrics_open.items() if "security" in op} == {"/predict"}
    assert "401" not in metrics_open["/metrics"]["responses"]


def test_cors_is_off_unless_configured(client: FlaskClient, make_app: Callable[..., Flask]) -> None:
    origin = {"Origin": "https://app.example"}
    assert "Access-Control-Allow-Origin" not in client.get("/healthz", headers=origin).headers
    cors = make_app(cors_origins=("https://app.example",), api_key="k").test_client()
    allowed = cors.get("/healthz", headers=origin)
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = cors.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    asking = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    preflight = cors.options("/predict", headers=origin | asking)
    assert preflight.status_code == 200  # no API key needed for the preflight
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


def test_security_headers_and_request_ids(client: FlaskClient) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    forged = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["X-Request-ID"])


# --- metrics, docs and the page --------------------------------------------------------------


def test_metrics_count_requests(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    client.post("/predict", data=png(), content_type="image/png", query_string=FAST)
    client.post("/predict", data=b"nope", content_type="image/png")
    client.get("/nowhere")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'captioner_http_requests_total{endpoint="/predict",method="POST",status="200"} 1\n' in text
    assert 'captioner_http_requests_total{endpoint="/predict",method="POST",status="422"} 1\n' in text
    assert 'captioner_http_requests_total{endpoint="unmatched",method="GET",status="404"} 1\n' in text
    assert "captioner_batch_size_count 1\n" in text
    assert 'captioner_model_info{name="tiny-test",version="0",device="cpu"} 1\n' in text


def series(metrics_text: str) -> set[tuple[str, str]]:
    """Each series of the exposition once: a histogram's buckets, sum and count are one series."""
    found = set()
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.rpartition(" ")[0].partition("{")
            found.add((re.sub(r"_(bucket|sum|count)$", "", name), re.sub(r',?le="[^"]*"', "", labels)))
    return found


def test_made_up_methods_add_at_most_two_series(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    before = series(client.get("/metrics").get_data(as_text=True))
    for i in range(100):
        assert client.open("/healthz", method=f"BREW{i}").status_code == 405
    added = series(client.get("/metrics").get_data(as_text=True)) - before
    added = {entry for entry in added if "/metrics" not in entry[1]}  # the scrape itself
    assert len(added) <= 2, added  # /healthz's counter (method "other") and its latency
    assert client.open("/no/such/path", method="BREW").status_code == 404
    text = client.get("/metrics").get_data(as_text=True)
    assert 'captioner_http_requests_total{endpoint="/healthz",method="other",status="405"} 100\n' in text
    assert 'captioner_http_requests_total{endpoint="unmatched",method="other",status="404"} 1\n' in text
    assert "BREW" not in text and "/no/such" not in text


def test_metric_rendering() -> None:
    metrics = ServiceMetrics()
    for value in (0.003, 0.02, 0.02, 7.0, 100.0):
        metrics.latency.observe(value, endpoint='/a"b')
    text = metrics.render()
    bucket = r'captioner_http_request_duration_seconds_bucket\{endpoint="/a\\"b",le="([^"]+)"\} (\d+)'
    buckets = re.findall(bucket, text)
    counts = [int(count) for _, count in buckets]
    assert buckets[0] == ("0.005", "1") and buckets[-1] == ("+Inf", "5")
    assert counts == sorted(counts)  # cumulative
    assert 'captioner_http_request_duration_seconds_sum{endpoint="/a\\"b"} 107.043' in text
    with pytest.raises(ValueError):
        metrics.requests.inc(endpoint="/x")  # labels missing


def test_openapi_documents_every_route(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    app = client.application
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert routes == set(document["paths"])
    parameters = {p["name"]: p["schema"] for p in document["paths"]["/predict"]["post"]["parameters"]}
    assert parameters["beam_size"]["maximum"] == ServiceConfig().max_beam_size
    assert (parameters["no_repeat_ngram_size"]["minimum"], parameters["no_repeat_ngram_size"]["maximum"]) == (0, 10)
    assert (parameters["repetition_penalty"]["minimum"], parameters["repetition_penalty"]["maximum"]) == (1, 10)


def test_the_page_and_its_assets_are_local(client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/app.js" in assets and "/static/style.css" in assets
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        # No external resource: the page must work without internet access.
        assert not re.search(r"https?://", served.get_data(as_text=True)), asset
