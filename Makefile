# Two commands a newcomer needs (see README): `make demo` and `make test`.
# Both create the virtual environment in .venv on first use (Python 3.11: torch 2.14.1 and
# torchvision 0.29.1 are pinned in pyproject.toml).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The demo's real images come from Debian's dataset-fashion-mnist; install it when we can.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

demo: $(STAMP)
	@test -f $(FASHION) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  echo "installing Debian's dataset-fashion-mnist for the demo's images" && \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || true
	$(BIN)/deltaclip demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
