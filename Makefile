# The two commands of the contract: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint format bench reproduce zoo run clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the project and its `fineprune` command

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint  ## install, lint, and run the whole test suite
	$(BIN)/python -m pytest -q --durations=15  # the slowest, so a CI log shows where its time went

run: install  ## start the API and one worker (embedded SQLite broker unless REDIS_URL is set)
	$(BIN)/fineprune serve

bench: install  ## time the fast sweep against the naive one on the seed CNN
	$(BIN)/python -m bench.sweep_bench

reproduce: install  ## the seed study end to end: train attacks, run defenses, write docs/study.md (~30 min)
	$(BIN)/python -m study.reproduce

zoo: install  ## the victim zoo: train what is missing (~/.cache), defend, detect, docs/experiments/zoo.md (hours; resumable)
	$(BIN)/python -m study.zoo build
	$(BIN)/python -m study.zoo defend --recipe default --half tune
	$(BIN)/python -m study.zoo defend --recipe default --half heldout
	$(BIN)/python -m study.zoo detect
	$(BIN)/python -m study.zoo report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
