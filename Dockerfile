# syntax=docker/dockerfile:1
# One image for the operator, the aggregator and the silo agent:
#   docker build -t ghcr.io/fedsilo/fedsilo:0.1.0 .                       (CPU, the default)
#   docker build --target cuda -t ghcr.io/fedsilo/fedsilo:0.1.0-cuda .    (CUDA torch + bitsandbytes:
#       bf16/fp16 and QLoRA silos on GPU nodes; check a node with scripts/gpu-check.sh)
ARG PYTHON_IMAGE=python:3.11-slim
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the PyTorch index (CPU wheels by default; CUDA via TORCH_INDEX_URL).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

# The CUDA build: CUDA wheels of the same torch, plus the `gpu` extra (bitsandbytes).
FROM ${PYTHON_IMAGE} AS build-cuda
ARG CUDA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --index-url "${CUDA_TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install "./[gpu]"

FROM ${PYTHON_IMAGE} AS base
LABEL org.opencontainers.image.title="fedsilo" \
      org.opencontainers.image.description="Federated PEFT fine-tuning: operator, aggregator, silo agent" \
      org.opencontainers.image.source="https://github.com/fedsilo/fedsilo"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    FEDSILO_CACHE_DIR=/cache
RUN groupadd --system --gid 10001 fedsilo \
    && useradd --system --uid 10001 --gid fedsilo --home-dir /home/fedsilo --create-home fedsilo \
    && mkdir -p /cache /data /var/lib/fedsilo \
    && chown fedsilo:fedsilo /cache /var/lib/fedsilo
COPY crds /opt/fedsilo/crds
WORKDIR /home/fedsilo
EXPOSE 8080 9090
ENTRYPOINT ["fedsilo"]
CMD ["--help"]

FROM base AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
USER 10001:10001

# Last stage: what a plain `docker build` produces.
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
