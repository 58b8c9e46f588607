# The two commands: `make test` and `make demo`. Both create/refresh the project virtualenv first
# (only when requirements.txt or pyproject.toml changed), so a fresh clone needs no other step.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# DeepSpeed JIT-compiles a small shared-memory comm op on first use (~50 s); keep it in one place
# so it is built once per checkout rather than once per process (train/distributed.py also makes the
# venv's ninja build it, whether or not the venv is activated: two ninja versions rebuild each other's).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all venv test demo bench ablation clean

all: test

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing dependencies into $(VENV) (first time: ~2 min)"
	@$(PY) -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import torch, deepspeed, transformers, sentencepiece, webdataset" 
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) scripts/demo.py

ablation: $(STAMP)
	$(PY) scripts/ablation.py

bench: $(STAMP)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_unified.py --out runs/bench/unified_cpu.json

clean:
	rm -rf runs .pytest_cache .cache
