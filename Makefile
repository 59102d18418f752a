# Two commands for a fresh machine: `make demo` (set up + quickstart report) and `make test`.
# `make test` is the full suite (what CI runs); `make test-fast` skips the tests marked `slow` (end-to-end
# runs, training, Ray) and takes under 3 minutes on 2 cores, for a quick loop while editing.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast setup clean
demo: $(STAMP)
	$(VENV)/bin/workbench run recipes/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV)
