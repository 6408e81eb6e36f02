# devtrust: `make demo` and `make test` do all set-up on a fresh Debian or Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config openssl python3-venv postgresql \
	dpkg-dev systemd chromium systemd-container debootstrap
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= demo-out

.PHONY: all deps venv sshd-ref demo deb test lint typecheck protos bench fuzz clean

all: test

# System packages: swtpm and its tools for the software TPMs, the TSS2 libraries that
# tpm2-pytss binds to, tpm2-tools for interop tests, openssl for checks on the demo's output,
# postgresql for the server the PostgreSQL store's tests start (tests/pg.py: initdb into a
# temporary directory, stopped at the end), dpkg-dev for `make deb` (dpkg-shlibdeps), systemd
# for systemd-analyze and the sysusers/tmpfiles the packages' tests run (present on a booted
# Debian, not in a container image; installing it starts nothing), chromium for the fleet
# report's test in a headless browser, systemd-container and debootstrap for the test that
# boots a Debian 12 container with systemd and runs the installed packages' services
# (tests/test_systemd_boot.py).
deps: .deps-stamp
.deps-stamp:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@touch $@

# Two stamps: `make demo` installs devtrust and what it needs at run time; `make test` adds
# the development tools (pytest, mypy, ruff, grpcio-tools).
venv: $(VENV)/.installed-dev
$(VENV)/.installed: pyproject.toml .deps-stamp
	@[ -x $(PY) ] || { echo "making $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing devtrust and its run-time dependencies into $(VENV)"
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PY) -m pip install --progress-bar on -e .
	@touch $@
$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "installing the development tools into $(VENV)"
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	@touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/devtrust-demo --out $(DEMO_OUT)
	openssl verify -CAfile $(DEMO_OUT)/ca-bundle.pem $(DEMO_OUT)/device-cert.pem

# Debian packages in dist/: devtrust-agent, devtrust-verifier and devtrust-gate, each a Python
# environment under /opt/devtrust made on Debian's python3 with the role's dependencies at
# this venv's versions, with the units, system users (sysusers.d), directories (tmpfiles.d)
# and configuration (packaging/build_deb.py). `apt install ./dist/devtrust-verifier_*.deb`.
# tests/test_deb_install.py builds them itself, installs them and purges them.
deb: $(VENV)/.installed
	$(PY) packaging/build_deb.py --out dist

# sshd itself for the sshd_config conformance test (tests/test_sshd_config.py compares our
# parser with `sshd -T`): unpacked from the apt archive, never installed, so no SSH service
# starts and no port opens. Skipped where the machine has /usr/sbin/sshd.
SSHD_DIR := .cache/openssh-server
sshd-ref: $(SSHD_DIR)/.unpacked
$(SSHD_DIR)/.unpacked: .deps-stamp
	@mkdir -p $(SSHD_DIR)
	@if [ ! -x /usr/sbin/sshd ]; then \
	  echo "unpacking openssh-server into $(SSHD_DIR) for the sshd_config test"; \
	  cd $(SSHD_DIR) && { apt-get download -q openssh-server libwrap0 >/dev/null 2>&1 || \
	    { $(SUDO) apt-get update -q >/dev/null && apt-get download -q openssh-server libwrap0; }; } && \
	  for deb in *.deb; do dpkg-deb -x "$$deb" .; done && rm -f *.deb; \
	fi
	@touch $@

test: venv sshd-ref
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check agent verifier swtpm tests protos bench

# mypy does not follow setuptools' mapping of folders to `devtrust.*` (pyproject.toml), so the
# check runs over a tree of links that has the installed package's shape.
TYPECHECK_TREE := .cache/typecheck/devtrust
typecheck: venv
	@rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)
	@for e in protos/devtrust/*; do ln -s "$$PWD/$$e" $(TYPECHECK_TREE)/; done
	@for d in agent verifier swtpm; do ln -s "$$PWD/$$d" $(TYPECHECK_TREE)/$$d; done
	$(VENV)/bin/mypy

protos: venv
	$(PY) -m protos.generate
	$(PY) -m devtrust.verifier.wire_schema --write

# Every benchmark, each in its own process: bench/results.json (one object per figure, with
# the baseline measured beside it in the same run) and BENCHMARKS.md. Fleets of 1,000 and
# 10,000 simulated devices take most of its time; BENCH_ARGS="--quick --fleet 1000" is shorter.
BENCH_ARGS ?=
bench: venv
	$(PY) -m bench.all $(BENCH_ARGS)

# Coverage-guided fuzzing (atheris) of every parser of device and operator bytes, FUZZ_RUNS
# inputs per harness, one harness after another (tests/fuzz/__main__.py). FUZZ=NAME runs one
# (tpms_attest, tpm2b_public, tpmt_signature, eventlog, evidence_body, smi_xml, sshd_config,
# policy). A crash leaves its input in fuzz-artifacts/ and fails the target.
FUZZ ?= all
FUZZ_RUNS ?= 1000000
fuzz: venv
	$(PY) -m tests.fuzz $(FUZZ) --runs $(FUZZ_RUNS)

clean:
	rm -rf $(VENV) .deps-stamp $(DEMO_OUT) dist .cache .pytest_cache .mypy_cache .ruff_cache fuzz-artifacts
