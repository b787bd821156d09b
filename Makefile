# `make demo` runs every phase and the evaluation on the built-in data (offline, CPU);
# `make test` runs the tests. Both create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR := $(or $(HARNESS_DEMO_DIR),outputs/demo)
# Machines without an NVIDIA GPU keep torch on the CPU wheel (constraints.txt); GPU machines get
# the normal CUDA build and faiss-gpu.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install demo test lint format clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	python3 -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(VENV)/bin/pip install -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip uninstall -y faiss-cpu && $(VENV)/bin/pip install faiss-gpu-cu12
else
	PIP_CONSTRAINT=constraints.txt $(VENV)/bin/pip install -r requirements.txt -r requirements-dev.txt
endif
	touch $@

demo: install
	$(PY) train_teacher.py --overwrite_output_dir
	$(PY) distill_student.py --overwrite_output_dir
	$(PY) refine_contrastive.py --overwrite_output_dir
	$(PY) refine_contrastive.py --student_model $(DEMO_DIR)/teacher --student_num_layers 2 \
		--output_dir $(DEMO_DIR)/student-contrastive-only --overwrite_output_dir
	$(PY) evaluate.py
	$(PY) export.py --overwrite_output_dir

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf outputs/demo
