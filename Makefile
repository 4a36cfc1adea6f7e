# Intake: `make run` starts everything, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PORT   ?= 5000
export INTAKE_PORT := $(PORT)
export BASE_URL ?= http://127.0.0.1:$(PORT)

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Intake needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,postgres]"
	@touch $(STAMP)

install: $(STAMP)

## run: migrate, then web (gunicorn), embedded Redis, worker and scheduler in one process group; Ctrl-C stops all
run: install
	$(BIN)/flask --app app migrate
	@echo "Intake: $(BASE_URL)  (Ctrl-C stops web, worker, scheduler and the embedded Redis)"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho --procfile Procfile start

## test: the whole pytest suite (Dovecot, squid, Chromium: see .ci/run for the packages)
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## bench: speed and memory measurements (not part of make test)
bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
