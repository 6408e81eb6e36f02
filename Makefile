# devtrust: `make demo` and `make test` do all set-up on a fresh Debian or Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config openssl python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= demo-out

.PHONY: all deps venv demo test lint typecheck protos bench clean

all: test

# System packages: swtpm and its tools for the software TPMs, the TSS2 libraries that
# tpm2-pytss binds to, tpm2-tools for interop tests, openssl for checks on the demo's output.
deps: .deps-stamp
.deps-stamp:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml .deps-stamp
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: venv
	$(VENV)/bin/devtrust demo --out $(DEMO_OUT)
	openssl verify -CAfile $(DEMO_OUT)/ca-bundle.pem $(DEMO_OUT)/device-cert.pem

test: venv
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check agent verifier swtpm tests protos/generate.py

typecheck: venv
	$(VENV)/bin/mypy

protos: venv
	$(PY) -m protos.generate

bench: venv
	$(PY) -m bench.appraisal && $(PY) -m bench.policy && $(PY) -m bench.posture_latency

clean:
	rm -rf $(VENV) .deps-stamp $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
