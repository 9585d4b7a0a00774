# Set-up is part of every target: the first run makes .venv from the pinned constraints.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps on one venv: `make run` installs only what serving needs (SERVE_STAMP); every
# other target adds the dev tools on top (STAMP). Both create .venv when it is missing.
SERVE_STAMP := $(VENV)/.serve-stamp
STAMP := $(VENV)/.dev-stamp
# checkov pins packages that clash with ours (jsonschema, for one): it gets a venv of its own,
# from its own pins, which only the deployment tests use.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp

.PHONY: run test lint format openapi bench profile clean

$(SERVE_STAMP): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ./client
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The tests' reference for quantities beyond the gradient, without the torchvision it
	# declares (only its examples import it, and PyPI's does not load beside this torch).
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt backpack-for-pytorch
	touch $(STAMP)

$(CHECKOV_STAMP): tests/deploy/checkov-constraints.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q -c tests/deploy/checkov-constraints.txt checkov
	touch $(CHECKOV_STAMP)

run: $(SERVE_STAMP)
	$(BIN)/gradsvc serve

# Two processes, whole files apiece (a file's shared servers start once): the end-to-end and
# fault tests spend much of their time waiting on servers, so two keep both cores busy.
test: lint $(CHECKOV_STAMP)
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check service tests bench client
	$(BIN)/ruff format --check service tests bench client
	$(BIN)/mypy service
	$(BIN)/mypy --strict client

format: $(STAMP)
	$(BIN)/ruff check --fix service tests bench client
	$(BIN)/ruff format service tests bench client

openapi: $(STAMP)
	$(BIN)/gradsvc openapi --output openapi/openapi.json

bench: $(STAMP)
	$(BIN)/python -m bench

# Where the bulk route's time goes under load (py-spy on the API process and a worker, and
# cProfile of the engine's batched step); PROFILE_OUT names the text report.
PROFILE_OUT ?= profile.txt
profile: $(STAMP)
	$(BIN)/python -m bench.profile $(PROFILE_OUT)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .mypy_cache .ruff_cache
