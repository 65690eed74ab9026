# Two commands a newcomer needs (see README): `make demo` and `make test`.
# Both create the virtual environment in .venv on first use (Python 3.11: torch 2.14.1 and
# torchvision 0.29.1 are pinned in pyproject.toml).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deps lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Debian packages, installed when missing and we can (root with apt-get); otherwise, or when
# the install fails, named, and the run goes on. The demo's real images come from
# dataset-fashion-mnist. The tests also drive the catalog page in Chromium (chromium,
# chromium-driver), route replicas through nginx, check docker-compose.yml with docker-compose,
# and compare the shipped WordNet table with wordnet-base.
DEMO_DEBS := dataset-fashion-mnist
TEST_DEBS := $(DEMO_DEBS) chromium chromium-driver nginx docker-compose wordnet-base
define install_debs
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | \
	  grep -q 'install ok installed' || echo $$p; done); missing=$$(echo $$missing); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
	    >/dev/null; } || echo "could not install $$missing: what needs them will fail"; \
	else echo "missing Debian packages (install them as root): $$missing"; fi
endef

demo: $(STAMP)
	$(call install_debs,$(DEMO_DEBS))
	$(BIN)/deltaclip demo

test-deps:
	$(call install_debs,$(TEST_DEBS))

test: $(STAMP) test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
