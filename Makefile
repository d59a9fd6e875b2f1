# Postbode: `make run` starts it on SQLite, `make test` runs the checks and the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint docs deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

# Development: domains send before their DNS records are published (see docs/security.md).
run: $(VENV)/.installed
	POSTBODE_ALLOW_UNVERIFIED_DOMAINS=$${POSTBODE_ALLOW_UNVERIFIED_DOMAINS:-true} $(BIN)/postbode serve

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy --strict src/postbode

test: lint
	$(BIN)/pytest -n 2 --dist loadgroup -q

# The peers the tests talk to, from Debian's packages (as root): see the README's "Tests".
deps:
	apt-get update -qq
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		swaks libnet-ssleay-perl postfix libsasl2-modules chromium libidn12 util-linux postgresql rspamd
	mkdir -p /var/cache/postbode-test-debs
	cd /var/cache/postbode-test-debs && apt-get download -qq exim4-daemon-light exim4-base exim4-config opensmtpd

docs: $(VENV)/.installed
	$(BIN)/postbode config --markdown > docs/configuration.md

clean:
	rm -rf $(VENV) data
