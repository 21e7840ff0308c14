"""The OpenAPI 3.1 description of the service, built from the running configuration.

Written by hand rather than generated: the API is small, and the limits a client has to respect
(beam size, caption length, images per request, upload size) are filled in from the configuration,
so the document always states the limits of the server that serves it.
"""

from __future__ import annotations

from typing import Any

from service.config import ServiceConfig
from service.errors import IMAGE_ERROR_STATUS

_JSON = "application/json"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _security(required: bool) -> dict[str, Any]:
    """An operation's security requirement, or none where this server leaves the operation open."""
    if not required:
        return {}
    return {"security": [{"bearerAuth": []}]}


def _unauthorized(required: bool) -> dict[str, Any]:
    return {"401": _error("The request lacks the API key (Authorization: Bearer <key>).")} if required else {}


def openapi_document(config: ServiceConfig, version: str) -> dict[str, Any]:
    """The document served at ``/openapi.json``.

    Security is stated as this server applies it: with an API key, /predict (and /metrics unless
    ``metrics_auth`` is ``open``) require the bearer key; without one, nothing does.
    """
    predict_auth, metrics_auth = config.api_key is not None, config.metrics_need_key
    options_schema: dict[str, Any] = {
        "beam_size": {
            "type": "integer", "minimum": 1, "maximum": config.max_beam_size, "default": config.default_beam_size,
            "description": "Beam width of the search; 1 is greedy decoding.",
        },
        "max_length": {
            "type": "integer", "minimum": 1, "maximum": config.max_caption_length,
            "default": config.default_max_length, "description": "Most words in a caption.",
        },
        "n_best": {
            "type": "integer", "minimum": 1, "default": 1,
            "description": "How many captions to return per image, best first (at most beam_size).",
        },
        "no_repeat_ngram_size": {
            "type": "integer", "minimum": 0, "maximum": 10,
            "description": "Never say the same run of this many words twice in a caption; 0 turns it off. "
            "Default: the model's own setting (decoding in its model.json), else 0.",
        },
        "repetition_penalty": {
            "type": "number", "minimum": 1, "maximum": 10,
            "description": "Make each word already in the caption this many times less likely; 1 turns it off. "
            "Default: the model's own setting, else 1.",
        },
        "attention": {
            "type": "boolean", "default": False,
            "description": "Also return the words of the best caption and each word's attention grid.",
        },
    }  # fmt: skip
    image_errors = ", ".join(sorted(code for code, status in IMAGE_ERROR_STATUS.items() if status == 422))
    query_options = [
        {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in options_schema.items()
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Captioner",
            "version": version,
            "description": (
                "Image captioning with a CNN encoder and an attention LSTM decoder (Show, Attend and Tell). "
                "Options may be given in the query string or in the form fields / JSON keys, once each."
            ),
        },
        "paths": {
            "/predict": {
                "post": {
                    "summary": "Caption one or more images",
                    "description": (
                        f"Up to {config.max_images} images per request, request body at most "
                        f"{config.max_upload_bytes} bytes. Images sent together are captioned in one batch."
                    ),
                    **_security(predict_auth),
                    "parameters": query_options,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": {
                                            "type": "array",
                                            "items": {"type": "string", "contentMediaType": "application/octet-stream"},
                                            "description": "One file field per image, each named 'image'.",
                                        },
                                        **options_schema,
                                    },
                                }
                            },
                            _JSON: {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "image": {"type": "string", "contentEncoding": "base64"},
                                        "images": {
                                            "type": "array",
                                            "items": {"type": "string", "contentEncoding": "base64"},
                                        },
                                        **options_schema,
                                    },
                                    "oneOf": [{"required": ["image"]}, {"required": ["images"]}],
                                }
                            },
                            "image/*": {"schema": {"type": "string", "contentMediaType": "image/*"}},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "One result per image, in request order.",
                            "content": {_JSON: {"schema": {"$ref": "#/components/schemas/PredictResponse"}}},
                        },
                        "400": _error(
                            "No image, malformed JSON or base64, an invalid option, or a body that was cut short "
                            "(incomplete_body) or is malformed chunked encoding (malformed_body)."
                        ),
                        **_unauthorized(predict_auth),
                        "413": _error(
                            "Body too large, too many images, an image with too many pixels, or a form with too "
                            "many parts or too large a text field; the message names the limit."
                        ),
                        "415": _error("Unsupported Content-Type."),
                        "422": _error(f"The data is not a usable image (code: {image_errors})."),
                        "500": _error("Internal error; the message holds a request id for the server log."),
                        "503": _error("Model still loading, queue full or shutting down; see Retry-After."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process answers",
                    "responses": {"200": {"description": "Alive."}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: the model is loaded and warmed up",
                    "responses": {"200": {"description": "Ready."}, "503": {"description": "Loading or failed."}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics of the worker process that answers",
                    **_security(metrics_auth),
                    "responses": {
                        "200": {
                            "description": "Text exposition format 0.0.4.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_unauthorized(metrics_auth),
                    },
                }
            },  # fmt: skip
            "/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1 document."}}}
            },
            "/": {
                "get": {
                    "summary": "A web page to caption an image and inspect the attention of each word",
                    "responses": {"200": {"description": "HTML page.", "content": {"text/html": {}}}},
                }
            },
        },
        "components": {
            **({"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}} if predict_auth else {}),
            "schemas": {
                "Caption": {
                    "type": "object",
                    "required": ["caption", "score"],
                    "properties": {
                        "caption": {"type": "string"},
                        "score": {"type": "number", "description": "Mean log-probability per token; higher is better."},
                    },
                },
                "Result": {
                    "type": "object",
                    "required": ["captions"],
                    "properties": {
                        "captions": {"type": "array", "items": {"$ref": "#/components/schemas/Caption"}},
                        "words": {"type": "array", "items": {"type": "string"}},
                        "attention": {
                            "type": "array",
                            "description": "Per word of the best caption, a grid_size x grid_size grid summing to 1.",
                            "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        },
                        "grid_size": {"type": "integer"},
                    },
                },
                "PredictResponse": {
                    "type": "object",
                    "required": ["results", "model", "timing_ms"],
                    "properties": {
                        "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
                        "model": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                        },
                        "timing_ms": {"type": "number", "description": "Time the server spent on the request."},
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
            },
        },
    }
