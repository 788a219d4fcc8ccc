# The README's two commands: `make repro` runs the pipeline, `make test` runs the tests.
# Both set everything up first (virtualenv, pinned packages, the offline dataset) and are
# quick when that is already done.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Stage commands call `python`; this puts the virtualenv's first on PATH. Each of the ~10 stage
# processes of a run imports torch and MLflow: Python's bytecode cache (its default, which some
# environments switch off with PYTHONDONTWRITEBYTECODE) saves each about 7 s after the first.
RUN    := PATH="$(CURDIR)/$(BIN):$$PATH" PYTHONDONTWRITEBYTECODE=
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data-deps stack-deps stack repro test test-fast lock clean

setup: $(STAMP)

# uv installs the ~6 GB of pinned wheels (torch's CUDA libraries) in parallel: 47 s here against
# 3.5 min for pip. Where uv cannot reach the index (a private mirror set up for pip only), pip
# does the same install. INSTALLER=pip skips uv.
INSTALLER ?= uv
UV_PIN    := uv==0.13.9

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned packages into $(VENV) (first time: 1-4 minutes, several GB)"
	@if [ "$(INSTALLER)" = uv ] && $(BIN)/pip install --disable-pip-version-check -qq $(UV_PIN) \
	    && $(BIN)/uv pip install --python $(BIN)/python -q -r requirements.lock; then :; \
	else echo "installing with pip"; $(BIN)/pip install --disable-pip-version-check -qq -r requirements.lock; fi
	$(BIN)/pip install --disable-pip-version-check -qq --no-deps -e .
	touch $@

# The offline default dataset: Debian's dataset-fashion-mnist, when apt is here and we are root.
# Without it the download stage fetches the same files from the official mirrors (needs internet).
data-deps:
	@if [ -f $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "note: could not install dataset-fashion-mnist; the download stage will try the internet"; \
	else echo "note: dataset-fashion-mnist not installed (no apt or not root); the download stage will try the internet"; fi

# PostgreSQL's server binaries for `make stack` and the team-stack tests (`python -m cnnlab_stack`
# finds them with pg_config, in /usr/lib/postgresql/*/bin or on PATH): Debian's postgresql, when
# apt is here and we are root. (Its package scripts may also start a system cluster on port 5432;
# the stack runs its own, on 15432.)
PG_FOUND := [ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	|| command -v initdb >/dev/null
stack-deps:
	@if $(PG_FOUND); then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
	    || echo "note: could not install postgresql; make stack needs its server binaries (the team-stack tests skip)"; \
	else echo "note: PostgreSQL server binaries not found (no apt or not root); make stack needs them (the team-stack tests skip)"; fi

# The team's tracking stack (PostgreSQL, SeaweedFS S3, MLflow with auth) on this machine, on
# 127.0.0.1; prints the client variables. `python -m cnnlab_stack status|env|down`: see cnnlab_stack.stack.
stack: setup stack-deps
	$(RUN) $(BIN)/python -m cnnlab_stack up

repro: setup data-deps
	$(RUN) $(BIN)/dvc repro

test: setup data-deps stack-deps
	$(RUN) $(BIN)/python -m pytest

test-fast: setup
	$(RUN) $(BIN)/python -m pytest -m "not slow"

# Re-pin the whole tree after editing requirements.in.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --disable-pip-version-check -q -r requirements.in
	{ echo "# Exact versions of the whole dependency tree, from: pip install -r requirements.in && pip freeze"; \
	  echo "# Regenerate with: make lock"; .venv-lock/bin/pip freeze; } > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) data/raw data/split data/augmented data/metrics data/plots
