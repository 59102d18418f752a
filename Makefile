# Two commands for a fresh machine: `make demo` (set up + quickstart report) and `make test`.
# `make test` is the full suite (what CI runs); `make test-fast` skips the tests marked `slow` (end-to-end
# runs, training, Ray) and takes under 3 minutes on 2 cores, for a quick loop while editing.
VENV ?= .venv
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp

.PHONY: demo test test-fast setup llama-cpp clean
demo: $(STAMP)
	$(VENV)/bin/workbench run recipes/quickstart.yaml

# The tests that judge no timing run two at a time (one file per worker, so a file's fixtures are built once);
# those marked `serial` (latencies, capacities, signals mid-run) then run alone, as a measurement must.
test: $(STAMP) $(LLAMA_STAMP)
	$(VENV)/bin/python -m pytest -q -m "not serial" -n 2 --dist loadfile
	$(VENV)/bin/python -m pytest -q -m serial

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

setup: $(STAMP)

# llama.cpp (llama-cpp-python compiled from source, 8-12 minutes once, and its GGUF converter): the
# `llama-cpp` backend and `gguf-quantize` step need it; the quickstart does not, so `make demo` skips it.
llama-cpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP) scripts/setup_llama_cpp.sh
	VENV=$(VENV) bash scripts/setup_llama_cpp.sh
	touch $(LLAMA_STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV)
