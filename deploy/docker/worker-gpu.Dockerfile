# GPU worker: PyPI's vllm (CUDA wheels bring their own CUDA libraries; the node
# needs the NVIDIA driver and container toolkit). Build from the repository root:
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t igw-worker-gpu .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
# The worker carries no gateway code: it needs only the shared package and its own.
COPY igw_common igw_common
COPY igw_worker_api igw_worker_api
COPY inference inference
RUN python -m venv /opt/igw \
 && /opt/igw/bin/pip install --no-cache-dir grpcio-tools \
 && /opt/igw/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
      protos/igw_worker_api/v1/worker.proto \
 && /opt/igw/bin/pip install --no-cache-dir '.[gpu]'

FROM python:3.11-slim
COPY --from=build /opt/igw /opt/igw
ENV PATH=/opt/igw/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin igw
USER 10001
# Models are mounted at /models (a volume), never baked into the image.
VOLUME /models
EXPOSE 50061 9465
ENTRYPOINT ["igw-worker"]
CMD ["--config", "/etc/igw/config.yaml"]
