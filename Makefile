# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(INSTALLED)

$(INSTALLED): setup.py requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: install
	$(BIN)/python demo/build_catalog.py data/demo
	$(BIN)/catalog-embed run --config configs/demo.yaml
	@echo; echo "== items most like the photo 'chelsea' (text 0.4, image 0.3, color 0.1, conse 0.2) =="
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --like chelsea -k 5
	@echo; echo "== photos found by words alone, through the conse encoder (text-to-image) =="
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --text "a cat" --weights conse=1 -k 3

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) lancedb data .pytest_cache
