# The tokenizer service (:8101): starts each model's tokenizer server (the model folder's Python
# script, which needs transformers; torch is not needed for tokenizing and is left out).
# Build from the repository root (docker-compose.yaml does):
#   docker build -f deploy/tokenizer-service.Dockerfile -t axm1-llm/tokenizer-service .
# Nothing here is architecture-specific: the same file builds for arm64 and amd64.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llm_service ./llm_service
COPY tokenizer_service ./tokenizer_service
COPY ax_emulator ./ax_emulator
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[tokenizer]"

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home axm1 \
    && mkdir -p /app/data && chown axm1:axm1 /app/data
WORKDIR /app
# Hugging Face libraries write caches under HOME; keep them in a writable place, and offline:
# every tokenizer comes from a model folder. /app/data is the service's own state (a lock, its
# children's owner tag). It starts only the tokenizer servers of the daemon's descriptor, for
# callers holding AXM1_TOKENIZER_SERVICE_SECRET (given at run time, never baked in).
ENV PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    AXM1_TOKENIZER_SERVICE_DATA_DIR=/app/data \
    AXM1_TOKENIZER_SERVICE_DESCRIPTOR=/app/model/model-descriptor.json
USER axm1
EXPOSE 8101
CMD ["axm1-llm", "tokenizer-service", "--host", "127.0.0.1"]
