# `make demo` and `make test` do all set-up: a .venv in the repo with the pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-lm test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: venv
	RAY_AUTH_MODE=disabled $(PY) -m pipeline run configs/mnistc_tent.yaml

# retrieval TTT on the embedded tiny LM; the first run trains it (~3-5 min) and embeds its KB (~2 min)
demo-lm: venv
	RAY_AUTH_MODE=disabled $(PY) -m pipeline run configs/lm_nn.yaml

test: venv
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
