# lora_kit: `make demo` runs the study on the embedded toy; `make test` runs the test suite;
# `make bench` compares lora_kit's training and evaluation with the plain peft + Trainer recipe.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
KERNEL  := lora_kit

.PHONY: install test demo bench clean-outputs

# Installs only when pyproject.toml changed since the last install, so it is quick when done.
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing lora_kit and its dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install --quiet -e '.[dev]' 2>$(VENV)/pip.log || { cat $(VENV)/pip.log; exit 1; }
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (lora_kit)" >/dev/null
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m lora_kit demo

# Arguments for the benchmark, e.g. BENCH_ARGS="--random-init" (no pretrained toy needed) or
# BENCH_ARGS="--toy-dir outputs/toy/<key> --threads 1"; the table goes to outputs/bench/bench.md.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m lora_kit bench $(BENCH_ARGS)

clean-outputs:
	rm -rf outputs/toy outputs/runs outputs/summary
