# Images of the captioner: the HTTP caption service (target "serve", the default) and training
# (target "train"). torch comes from the CPU wheel index unless TORCH_INDEX_URL names a CUDA one,
# as docker-compose.yml does for its GPU services.
#
#   docker build -t captioner .                        CPU service
#   docker run -p 8000:8000 -v "$PWD/weights:/app/weights:ro" captioner
#
# Model weights are not baked in: mount a folder holding default/ (model.json, model.safetensors)
# at /app/weights, or point CAPTIONER_MODEL_DIR elsewhere.

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN useradd --create-home --uid 10001 captioner
WORKDIR /app

# torch first, in its own layer: it is by far the largest download and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY captioner ./captioner
COPY service ./service
COPY training ./training


FROM base AS train
RUN pip install ".[train]"
USER captioner
CMD ["python", "-m", "training.train", "--help"]


FROM base AS serve
RUN pip install ".[serve]"
USER captioner
ENV CAPTIONER_MODEL_DIR=/app/weights/default
EXPOSE 8000
# Ready only once the model is loaded and warmed up; python:slim has no curl, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# SIGTERM (docker stop) reaches gunicorn's master directly: python -m service execs it.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
