"""``POST /predict``: images in, captions (and optionally attention maps) out.

Three ways to send images, so that a browser form, ``curl --data-binary`` and a JSON client all work:
multipart form fields named ``image`` (several fields, several images), a raw body with an image
Content-Type, or JSON ``{"image": "<base64>"}`` / ``{"images": [...]}``. Options come from the query
string and from the form fields or JSON keys; naming one twice is an error rather than a guess.

The request thread reads every image, and has the worker's decode threads decode them, before anything
is queued, so a bad image is answered with its own 4xx and never reaches the batcher where it could
fail a whole batch. Reading, decoding and captioning share one deadline, ``request_timeout_s`` from
the start of the request.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request

from captioner import CaptionResult, OptionError
from captioner.decoding import SearchOptions
from service.auth import require_api_key
from service.body import read_body, read_form
from service.config import ServiceConfig, parse_bool
from service.errors import ServiceError
from service.runtime import runtime_of

blueprint = Blueprint("predict", __name__)

OPTION_NAMES = ("beam_size", "max_length", "n_best", "attention", "no_repeat_ngram_size", "repetition_penalty")
MAX_NO_REPEAT_NGRAM_SIZE = 10
MAX_REPETITION_PENALTY = 10.0

# Content-Types accepted for a raw image body. Other image/* types (SVG, HEIC...) are formats the
# decoder does not read, so they are refused up front with 415 rather than failing to decode.
RAW_IMAGE_TYPES = frozenset(
    {
        "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/gif", "image/webp", "image/bmp",
        "image/x-ms-bmp", "image/tiff", "image/avif", "application/octet-stream",
    }
)  # fmt: skip

ATTENTION_DECIMALS = 4


@dataclass(frozen=True)
class PredictOptions:
    search: SearchOptions
    attention: bool


@blueprint.before_request
def _authenticate() -> None:
    """With an API key configured, /predict needs ``Authorization: Bearer <key>`` (CORS preflights excepted)."""
    if request.method != "OPTIONS":
        require_api_key(_config())


@blueprint.post("/predict")
def predict() -> Response:
    started = time.perf_counter()
    deadline = time.monotonic() + _config().request_timeout_s
    runtime = runtime_of(current_app)
    metrics = runtime.metrics
    metrics.in_flight.inc()
    try:
        if not runtime.ready:
            if runtime.failed:
                raise ServiceError(503, "model_unavailable", "the model is unavailable; see the server log")
            raise ServiceError(503, "model_loading", "the model is still loading; retry shortly", {"Retry-After": "5"})
        config = runtime.config
        with runtime.arriving() as arrival:  # the batcher waits for this request only while it prepares
            images, values = _read_request(config)
            assert runtime.captioner is not None  # ready
            options = parse_options(values, config, runtime.captioner.info.decoding)
            pixels = runtime.preprocess_all(images, deadline)
            results = runtime.caption(pixels, options.search, arrival, deadline)
        metrics.images.inc(len(results))
        assert runtime.captioner is not None
        info = runtime.captioner.info
        body = {
            "results": [_result_json(result, options.attention, runtime.captioner.grid_size) for result in results],
            "model": {"name": info.name, "version": info.version},
            "timing_ms": round((time.perf_counter() - started) * 1000.0, 2),
        }
        response = jsonify(body)
        response.headers["Cache-Control"] = "no-store"
        return response
    finally:
        metrics.in_flight.dec()


def _config() -> ServiceConfig:
    return runtime_of(current_app).config


def _read_request(config: ServiceConfig) -> tuple[list[bytes], dict[str, list[Any]]]:
    """The encoded images of the request and its options (each option name with every value given)."""
    values: dict[str, list[Any]] = {name: request.args.getlist(name) for name in request.args}
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        images = _read_multipart(config, values)
    elif mimetype == "application/json" or mimetype.endswith("+json"):
        images = _read_json(config, values)
    elif mimetype in RAW_IMAGE_TYPES:
        images = [read_body(config.max_upload_bytes)]
    elif not mimetype and not request.content_length and "chunked" not in request.headers.get("Transfer-Encoding", ""):
        raise ServiceError(400, "missing_image", _MISSING_IMAGE)
    else:
        shown = mimetype or "none"
        raise ServiceError(
            415, "unsupported_media_type",
            f"unsupported Content-Type ({shown[:100]}); send multipart/form-data with an 'image' field, "
            "application/json with base64 'image' or 'images', or the image itself as "
            "image/jpeg, image/png, image/gif, image/webp, image/bmp, image/tiff or image/avif",
        )  # fmt: skip
    if not any(images):  # nothing, or only empty parts (a browser form submitted without choosing a file)
        raise ServiceError(400, "missing_image", _MISSING_IMAGE)
    return images, values


_MISSING_IMAGE = (
    "no image in the request: send it as the multipart field 'image', as the request body with an "
    "image Content-Type, or as base64 in the JSON field 'image'"
)


def _read_multipart(config: ServiceConfig, values: dict[str, list[Any]]) -> list[bytes]:
    form, files = read_form()
    try:
        if "image" in form:
            raise ServiceError(400, "invalid_image_field", "the 'image' field must be a file upload, not a text value")
        for name in form:
            values.setdefault(name, []).extend(form.getlist(name))
        uploads = files.getlist("image")
        _check_count(len(uploads), config)
        return [upload.read() for upload in uploads]
    finally:  # werkzeug closes only the files of request.files; these were parsed here
        for _, upload in files.items(multi=True):
            upload.close()


def _read_json(config: ServiceConfig, values: dict[str, list[Any]]) -> list[bytes]:
    try:
        document = json.loads(read_body(config.max_upload_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ServiceError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    except ValueError:  # the only other refusal of json.loads: an integer over Python's digit limit
        limit = sys.get_int_max_str_digits()
        raise ServiceError(400, "invalid_json", f"the JSON body holds an integer of more than {limit} digits") from None
    except RecursionError:  # absurdly deep nesting, which no valid request has
        raise ServiceError(400, "invalid_json", "the JSON body is nested too deeply") from None
    if not isinstance(document, dict):
        raise ServiceError(400, "invalid_json", "the JSON body must be an object")
    if "image" in document and "images" in document:
        raise ServiceError(400, "invalid_json", "give either 'image' or 'images', not both")
    if "images" in document:
        encoded = document.pop("images")
        if not isinstance(encoded, list):
            raise ServiceError(400, "invalid_json", "'images' must be a list of base64 strings")
        labels = [f"images[{i}]" for i in range(len(encoded))]
    elif "image" in document:
        encoded, labels = [document.pop("image")], ["image"]
    else:
        raise ServiceError(400, "missing_image", _MISSING_IMAGE)
    for name, value in document.items():
        values.setdefault(name, []).append(value)
    _check_count(len(encoded), config)
    return [_decode_base64(value, label) for value, label in zip(encoded, labels, strict=True)]


def _decode_base64(value: object, label: str) -> bytes:
    """Standard or URL-safe base64, with or without padding, line breaks or a ``data:`` URL prefix."""
    if not isinstance(value, str):
        raise ServiceError(400, "invalid_base64", f"{label} must be a base64 string")
    text = value.partition(",")[2] if value.startswith("data:") else value
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "invalid_base64", f"{label} is not valid base64") from None


def _check_count(count: int, config: ServiceConfig) -> None:
    if count > config.max_images:
        raise ServiceError(413, "too_many_images", f"{count} images in one request; the limit is {config.max_images}")


def parse_options(
    values: dict[str, list[Any]], config: ServiceConfig, model_decoding: dict[str, Any] | None = None
) -> PredictOptions:
    """Validate the request's options against the service's limits; any bad value is a 400. Options
    the request leaves out take the model's own decoding settings (``model_decoding``), else the
    search's defaults."""
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise ServiceError(400, "unknown_option", f"unknown option {shown}; the options are {', '.join(OPTION_NAMES)}")
    single = {}
    for name, given in values.items():
        if len(given) != 1:
            raise ServiceError(400, "invalid_option", f"{name} is given {len(given)} times; give it once")
        single[name] = given[0]
    beam_size = _integer(single, "beam_size", config.default_beam_size, config.max_beam_size)
    max_length = _integer(single, "max_length", config.default_max_length, config.max_caption_length)
    n_best = _integer(single, "n_best", 1, beam_size)
    attention = _boolean(single, "attention", False)
    repeats = dict(model_decoding or {})
    if "no_repeat_ngram_size" in single:
        repeats["no_repeat_ngram_size"] = _integer(single, "no_repeat_ngram_size", 0, MAX_NO_REPEAT_NGRAM_SIZE, 0)
    if "repetition_penalty" in single:
        repeats["repetition_penalty"] = _number(single, "repetition_penalty", 1.0, MAX_REPETITION_PENALTY)
    try:
        search = SearchOptions(beam_size=beam_size, max_length=max_length, n_best=n_best, **repeats)
    except OptionError as error:
        raise ServiceError(400, "invalid_option", error.message) from None
    return PredictOptions(search, attention)


def _integer(values: dict[str, Any], name: str, default: int, maximum: int, minimum: int = 1) -> int:
    if name not in values:
        return default
    value = values[name]
    problem = f"{name} must be an integer from {minimum} to {maximum}"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ServiceError(400, "invalid_option", f"{problem}, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ServiceError(400, "invalid_option", f"{problem}, got {_show(value)}")
    return value


def _number(values: dict[str, Any], name: str, minimum: float, maximum: float) -> float:
    value = values[name]
    problem = f"{name} must be a number from {minimum:g} to {maximum:g}"
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ServiceError(400, "invalid_option", f"{problem}, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
        raise ServiceError(400, "invalid_option", f"{problem}, got {_show(value)}")
    return float(value)


def _boolean(values: dict[str, Any], name: str, default: bool) -> bool:
    if name not in values:
        return default
    value = values[name]
    parsed = value if isinstance(value, bool) else parse_bool(value) if isinstance(value, str) else None
    if parsed is None:
        raise ServiceError(400, "invalid_option", f"{name} must be true or false, got {_show(value)}")
    return parsed


def _show(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _result_json(result: CaptionResult, attention: bool, grid_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "captions": [{"caption": c.caption, "score": round(c.score, 6)} for c in result.n_best],
    }
    if attention:
        entry["words"] = list(result.words)
        entry["attention"] = _rounded(result.attention)  # (len(words), grid_size, grid_size)
        entry["grid_size"] = grid_size
    return entry


def _rounded(maps: np.ndarray) -> list[Any]:
    return np.round(maps.astype(np.float64), ATTENTION_DECIMALS).tolist()
