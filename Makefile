# Set-up is part of every target: the first run makes .venv from the pinned constraints.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint format openapi bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The tests' reference for quantities beyond the gradient, without the torchvision it
	# declares (only its examples import it, and PyPI's does not load beside this torch).
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt backpack-for-pytorch
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gradsvc serve

test: lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy service

format: $(STAMP)
	$(BIN)/ruff check --fix service tests bench
	$(BIN)/ruff format service tests bench

openapi: $(STAMP)
	$(BIN)/gradsvc openapi --output openapi/openapi.json

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
