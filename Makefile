# Two commands do all set-up on a fresh machine with Python >= 3.10:
#   make train   -> creates .venv, installs hf_ddpm, trains the default digits model into ./output
#   make test    -> creates .venv, installs hf_ddpm[test], runs ruff and the test suite
# GPU users: install your own torch build into .venv first (TORCH_SPEC= skips the CPU pin).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# accelerate launch gives a process one CPU thread unless told; a CPU run should use the cores it has
NPROC ?= $(shell nproc)

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

.PHONY: install train distill test lint
install: $(BIN)/.installed

train: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(NPROC) scripts/train.py $(ARGS)

# distil the trained model (./output) into 8-, 4-, 2- and 1-step students in ./output-distilled
distill: install
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(NPROC) scripts/distill.py output $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
