# fairseq-memtrm: `make test` and `make demo` do all of the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
FAIRSEQ := fairseq-fixed==0.12.3.1

.PHONY: install test demo demo-model clean

install: $(STAMP)

# torch is pinned exactly: pip takes that CPU build from local disk, where any
# looser requirement would download a multi-GB CUDA build. fairseq-fixed is
# built without build isolation so that its build reuses this torch, and with
# --no-deps so that it cannot pull torchaudio (which would replace torch).
$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt $(TORCH)
	$(BIN)/pip install -q --no-deps --no-build-isolation $(FAIRSEQ)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The demo model is committed (fp16, with its spm.model and dict.txt); it is
# built here only where it is missing (quick recipe, ~8 min). `make demo-model`
# rebuilds the committed one with the longer recipe below (~40 min on 2 cores).
DEMO_MODEL := demo/assets/demo_model.pt
DEMO_ARGS ?=

$(DEMO_MODEL): | $(STAMP)
	$(BIN)/python scripts/make_demo_model.py

demo: $(STAMP) $(DEMO_MODEL)
	$(BIN)/python demo/app.py --checkpoint $(DEMO_MODEL) --port 7860 $(DEMO_ARGS)

DEMO_MODEL_RECIPE := --pretrain-updates 3000 --pretrain-minutes 25 --finetune-updates 1000 --finetune-minutes 12

demo-model: $(STAMP)
	$(BIN)/python scripts/make_demo_model.py --force $(DEMO_MODEL_RECIPE)

clean:
	rm -rf $(VENV) build *.egg-info
