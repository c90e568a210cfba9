# fairseq-memtrm: `make test` and `make demo` do all of the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
FAIRSEQ := fairseq-fixed==0.12.3.1

.PHONY: install test demo demo-cache demo-model clean

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

# The demo models are committed (fp16, each with its spm.model and dict.txt): the
# memorizing fine-tunes of the code and books experiments (docs/experiment-log.md).
# `make demo-model` rebuilds both with scripts/make_demo_model.py, fine-tuning the
# committed vanillas (demo/assets/CORPUS/vanilla.pt; ~1 hour on 2 cores; the books one
# needs ../shared/data/books), which also runs for a committed file that is missing. The books test split, where it exists, is
# offered as sample documents (read with the books model).
CODE_MODEL  := demo/assets/code/demo_model.pt
BOOKS_MODEL := demo/assets/books/demo_model.pt
BOOK_SAMPLES := $(wildcard ../shared/data/books/test)
DEMO_ARGS ?= $(if $(BOOK_SAMPLES),--samples $(BOOK_SAMPLES))

$(CODE_MODEL): | $(STAMP)
	$(BIN)/python scripts/make_demo_model.py --corpus code

$(BOOKS_MODEL): | $(STAMP)
	$(BIN)/python scripts/make_demo_model.py --corpus books

demo: $(STAMP) $(CODE_MODEL) $(BOOKS_MODEL)
	$(BIN)/python demo/app.py --checkpoint code=$(CODE_MODEL) --checkpoint books=$(BOOKS_MODEL) \
		--port 7860 $(DEMO_ARGS)

# Reads every sample once with the default settings into ~/.cache/fairseq_memtrm/demo, so that a
# sample opens at once in `make demo` (the first one as the page loads); long on 2 cores for novels.
demo-cache: $(STAMP) $(CODE_MODEL) $(BOOKS_MODEL)
	$(BIN)/python demo/app.py --checkpoint code=$(CODE_MODEL) --checkpoint books=$(BOOKS_MODEL) \
		$(DEMO_ARGS) --precompute

demo-model: $(STAMP)
	$(BIN)/python scripts/make_demo_model.py --corpus code --force
	$(BIN)/python scripts/make_demo_model.py --corpus books --force

clean:
	rm -rf $(VENV) build *.egg-info
