# fieldline: `make demo` runs the demo, `make test` runs lint, type checks and every test.
# Both install what is missing first (Debian packages when root or with sudo, then a venv).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-deps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_ARGS ?=

.PHONY: setup vendor dist pi-check pi-deps system-deps demo test lint typecheck unit bench bench-detect soak clean grafana

setup: system-deps $(STAMP) vendor

# the web view's chart library, from npm at its pinned version and integrity (once)
vendor: $(STAMP)
	@$(BIN)/python -m fieldline.view.vendor

system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto mosquitto-clients"; \
	command -v influxd >/dev/null 2>&1 || missing="$$missing influxdb"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	$(PY) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /sbin/mkfs.ext4 ] || missing="$$missing e2fsprogs"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# what a gateway installs from: the wheel (the view's vendored chart library and the shipped
# configs, share/fieldline/deploy, inside) and install-edge.sh beside it (the one command)
dist: setup
	rm -rf dist
	$(BIN)/python -m pip wheel -q --no-deps -w dist .
	cp deploy/pi/install-edge.sh dist/
	@ls dist/*.whl dist/install-edge.sh

demo: setup
	$(BIN)/fieldline demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check devices edge cloud simulators fieldline tests bench

typecheck: setup
	$(BIN)/mypy

# the tests that need no service binaries run on two processes (they are CPU-bound and
# time nothing); those that start Mosquitto, InfluxDB, NATS and the fieldline processes run one
# at a time, as their fault timings assume
unit: setup
	$(BIN)/pytest -q -n 2 --dist loadfile -m 'not integration and not soak and not pi' \
		--durations=15
	$(BIN)/pytest -q -m 'integration and not soak and not pi' --durations=30

test: lint typecheck unit

# as root it also measures the agent on the emulated arm64 root (pi-deps, bench/arm64.py)
bench: setup pi-deps
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.run

# anomaly detection on the labelled recordings only: make bench-detect DATA=../shared/data
DATA ?= ../shared/data
bench-detect: setup
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.detect --data $(DATA)

pi-deps:
	@command -v debootstrap >/dev/null 2>&1 && command -v qemu-aarch64-static >/dev/null 2>&1 \
	  && command -v update-binfmts >/dev/null 2>&1 || { \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    debootstrap qemu-user-static binfmt-support; }

# the agent on an emulated Raspberry Pi OS 64-bit (Debian 12 arm64 root: debootstrap +
# qemu-user-static); as root; the root is kept in /var/tmp/fieldline-pi-arm64 between runs
pi-check: setup pi-deps
	$(SUDO) $(BIN)/pytest -q -s -m pi tests/test_pi.py --timeout 3600

# the long tier: the fault soak, then the emulated arm64 tier (too long for CI: 10-14 min on a
# fresh 2-core machine, root build included; 5-6 min with the root kept)
soak: setup
	$(BIN)/pytest -q -m soak --timeout 3600
	$(MAKE) pi-check

grafana: setup
	$(BIN)/fieldline grafana export deploy/grafana

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
