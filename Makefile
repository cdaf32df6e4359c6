# Two commands set up a fresh machine:
#   make demo   - the main job on embedded defaults (real LiteMedSAM weights, shipped real data)
#   make test   - build the environment from nothing and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core of the 2-core CI machine; each runs torch single-threaded
# (tests/conftest.py). PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= 2

.PHONY: env system-deps lint-imports test test-fast demo bench bench-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[export,dicom,logging,data,test]"
	touch $(STAMP)

env: $(STAMP)

# Real atlas data (Colin27 + AAL) comes from Debian's mricron-data; installed when missing.
system-deps:
	@if [ ! -f /usr/share/mricron/templates/aal.nii.gz ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data) >/dev/null \
	      || echo "warning: could not install mricron-data; real-atlas tests will skip"; \
	  else echo "warning: not root, mricron-data not installed; real-atlas tests will skip"; fi; \
	fi

# Import-layer contracts ([tool.importlinter] in pyproject.toml). import-linter walks medico_peft/ on
# disk, where export/ (installed as medico_peft.export through package-dir) is absent, so it runs in a
# scratch mirror whose medico_peft/ links every entry of the real one plus export -> export/.
IMPORT_MIRROR := build/import-graph
lint-imports: $(STAMP)
	@rm -rf $(IMPORT_MIRROR) && mkdir -p $(IMPORT_MIRROR)/medico_peft
	@for p in medico_peft/*; do ln -s "$(CURDIR)/$$p" "$(IMPORT_MIRROR)/$$p"; done
	@ln -sfn "$(CURDIR)/export" "$(IMPORT_MIRROR)/medico_peft/export"
	cd $(IMPORT_MIRROR) && $(abspath $(VENV))/bin/lint-imports --no-cache --config "$(CURDIR)/pyproject.toml"

test: $(STAMP) system-deps lint-imports
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: $(STAMP) lint-imports
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/medico-peft demo

bench: $(STAMP) system-deps
	$(PY) -m benchmarks.run_all

# Every results file starts with the scripts' header; every figure README's Results section quotes is in one.
bench-check: $(STAMP)
	$(PY) -m benchmarks.run_all --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
