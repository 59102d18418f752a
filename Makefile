# Two commands for a fresh machine: `make demo` (set up + quickstart report) and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean
demo: $(STAMP)
	$(VENV)/bin/workbench run recipes/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV)
