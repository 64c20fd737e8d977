# syntax=docker/dockerfile:1
# One image for the operator, the aggregator and the silo agent:
#   docker build -t ghcr.io/fedsilo/fedsilo:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t fedsilo:cuda .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the PyTorch index (CPU wheels by default; CUDA via TORCH_INDEX_URL).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install .

FROM ${PYTHON_IMAGE} AS runtime
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
COPY --from=build /opt/venv /opt/venv
COPY crds /opt/fedsilo/crds
USER 10001:10001
WORKDIR /home/fedsilo
EXPOSE 8080 9090
ENTRYPOINT ["fedsilo"]
CMD ["--help"]
