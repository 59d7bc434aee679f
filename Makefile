# Two commands on a fresh clone: `make demo` (train and show an EDST ensemble) and `make test`.
# Each sets up .venv first: torch and torchvision pinned explicitly, then this project, editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps nvidia-pytriton==0.7.0  # wants numpy<2; only its tritonserver is used
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/freetickets train --recipe training/recipes/fmnist_demo_edst.yaml --output-dir runs/demo --overwrite
	$(BIN)/python -m freetickets_hub.training.demo runs/demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -m "not slow" -q

# the serving page's test drives Debian's chromium through Playwright (Playwright's own download fails offline)
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
