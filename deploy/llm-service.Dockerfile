# The daemon's image: Ollama and OpenAI APIs on :11535, plus the emulator (ax-emulator) for the
# virtual card. Build from the repository root (docker-compose.yaml does):
#   docker build -f deploy/llm-service.Dockerfile -t axm1-llm/llm-service .
# Nothing here is architecture-specific: the same file builds for arm64 (Raspberry Pi 5) and amd64.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llm_service ./llm_service
COPY tokenizer_service ./tokenizer_service
COPY ax_emulator ./ax_emulator
# Wheels for the project and its dependencies, so the final stage installs without a compiler;
# with the postgres extra (psycopg, a few MB), so that jobs_url can name a shared job store.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres]"

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home axm1 \
    && mkdir -p /app/metrics /app/data && chown axm1:axm1 /app/metrics /app/data
WORKDIR /app
# The card's runtime is mounted from the host (docker-compose.yaml): libraries and tools.
# /app/data is the daemon's own state (a lock, its children's owner tag): it must be writable.
ENV PYTHONUNBUFFERED=1 \
    LD_LIBRARY_PATH=/usr/lib/axcl \
    PATH=/usr/bin/axcl:$PATH \
    AXM1_DESCRIPTOR=/app/model/model-descriptor.json \
    AXM1_METRICS_DIR=/app/metrics \
    AXM1_DATA_DIR=/app/data
# Non-root: the AXCL device nodes are 0666 after the card's installer; see docker-compose.yaml.
USER axm1
EXPOSE 11535
CMD ["axm1-llm", "serve"]
