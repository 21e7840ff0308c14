"""The API description (``/openapi.json``) and the web page (``/``) for people trying the model."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, send_from_directory

import captioner
from service.openapi import openapi_document
from service.runtime import runtime_of

blueprint = Blueprint("docs", __name__)


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document(runtime_of(current_app).config, captioner.__version__))


@blueprint.get("/")
def index() -> Response:
    assert current_app.static_folder is not None  # create_app always sets it
    return send_from_directory(current_app.static_folder, "index.html")
