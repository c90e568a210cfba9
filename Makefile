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

# The demo model is committed (fp16, with its spm.model and dict.txt): the code
# experiment's memorizing fine-tune (README, Results). `make demo-model` rebuilds
# it with scripts/make_demo_model.py (~75 min on 2 cores), which also runs when
# the committed file is missing.
DEMO_MODEL := demo/assets/demo_model.pt
DEMO_ARGS ?=

$(DEMO_MODEL): | $(STAMP)
	$(BIN)/python scripts/make_demo_model.py

demo: $(STAMP) $(DEMO_MODEL)
	$(BIN)/python demo/app.py --checkpoint $(DEMO_MODEL) --port 7860 $(DEMO_ARGS)

demo-model: $(STAMP)
	$(BIN)/python scripts/make_demo_model.py --force

clean:
	rm -rf $(VENV) build *.egg-info
