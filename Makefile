# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and
# installs bnfold with its test tools; torch is pinned through constraints.txt (PIP_CONSTRAINT) so the
# CPU build is used, never the multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install clean-venv bench samples

$(STAMP): pyproject.toml constraints.txt bnfold/_moments.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@# the moments kernel is an optional extension: pip says nothing when it fails to build
	@$(PY) -c 'import bnfold._moments' 2>/dev/null || echo "warning: bnfold's moments kernel \
	(bnfold/_moments.c) was not built, so recalibration runs on torch's slower passes; \
	'$(PY) -m pip install -v --no-deps -e .' shows why" >&2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) sample_models/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/run_all.py

samples: $(STAMP)
	$(PY) sample_models/make_samples.py

clean-venv:
	rm -rf $(VENV)
