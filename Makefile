# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test`.
# Both create/use a local virtual environment in .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch goes in first: resolving plain "torch" would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_SCALE ?= demo
DEMO_OUT ?= runs/demo
DEMO_TRAIN ?= runs/demo-train
DEMO_QUALITY ?= runs/quality-demo

.PHONY: install demo test lint bench clean help

help:
	@echo "make demo   fetch the real demo corpus, run the pipeline on local Ray, train a tiny Jamba with DeepSpeed on CPU"
	@echo "make test   run the test suite (real data, real Ray)"
	@echo "make lint   ruff"
	@echo "make bench  benchmarks side by side with datatrove / raw tokenizers (writes bench/results/)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,demo,train,airflow]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pipeline fetch-demo --scale $(DEMO_SCALE)
	$(PY) -m pipeline fetch-evals
	@echo "== training the fastText quality classifier (reference prose vs boilerplate) =="
	JAMBA_DEMO_DATA=$${JAMBA_DEMO_DATA:-$$HOME/.cache/jamba-pretrain/demo/$(DEMO_SCALE)} \
	  $(PY) -m pipeline quality train --config configs/quality/demo.yaml --output $(DEMO_QUALITY)
	JAMBA_DEMO_DATA=$${JAMBA_DEMO_DATA:-$$HOME/.cache/jamba-pretrain/demo/$(DEMO_SCALE)} \
	JAMBA_QUALITY_MODEL=$(DEMO_QUALITY)/model.bin \
	  $(PY) -m pipeline run configs/pipeline/demo.yaml --output $(DEMO_OUT)
	$(PY) -m pipeline inspect $(DEMO_OUT) --decode 2 --max-chars 300
	@echo "== training a tiny Jamba on $(DEMO_OUT) with DeepSpeed: 2 CPU ranks, experts split over both =="
	$(VENV)/bin/deepspeed --num_gpus 2 --module train --config configs/train/tiny-cpu.yaml \
	  --set "data.runs=[$(DEMO_OUT)]" --set checkpoint.dir=$(DEMO_TRAIN)
	$(PY) -m train export --checkpoint $(DEMO_TRAIN) --native $(DEMO_TRAIN)/final --to-hf $(DEMO_TRAIN)/final/hf --overwrite
	$(PY) -m train.plot $(DEMO_TRAIN)/metrics.jsonl --out $(DEMO_TRAIN)/loss.png
	$(PY) -m model generate --checkpoint $(DEMO_TRAIN)/final/hf --tokenizer $(DEMO_OUT)/tokenizer/tokenizer.json \
	  --prompt "The " --max-new-tokens 30 --temperature 0.8 --top-p 0.95
	@echo "trained checkpoint: $(DEMO_TRAIN)/final (native) and $(DEMO_TRAIN)/final/hf (Hugging Face); loss curve: $(DEMO_TRAIN)/loss.png"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/pipeline_throughput.py
	$(PY) bench/dedup.py --sig-docs 3000 --sizes 10000 100000
	$(PY) bench/quality.py

clean:
	rm -rf runs .pytest_cache
