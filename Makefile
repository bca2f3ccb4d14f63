# flagops developer entry points. `make setup` needs only PyPI: the Ansible collections
# come out of the PyPI `ansible` wheel, installed by flagops itself (`flagops setup`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup venv collections lint test-unit test-contract test test-lab test-slow quickstart lab-down wheel collection

setup: venv collections

venv: $(VENV)/.flagops-installed

$(VENV)/.flagops-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]'
	touch $@

# Idempotent: `flagops setup` checks the installed versions and downloads the bundle once.
collections: venv
	$(VENV)/bin/flagops setup

# ruff (Python), yamllint (all YAML), ansible-lint (production profile: roles, playbooks).
lint: venv
	$(VENV)/bin/ruff check flagops tests bench
	$(VENV)/bin/yamllint .
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH ANSIBLE_COLLECTIONS_PATH=$$($(PY) -c 'from flagops import resources; print(resources.collections_dir())') \
	  $(VENV)/bin/ansible-lint --profile production --offline

# The wheel (`pip install dist/flagops-*.whl` gives the whole tool) and the roles as the
# Ansible collection flagops.flagos (galaxy.yml at the root; build_ignore keeps it to roles).
wheel: venv
	$(PIP) wheel . --no-deps -w dist

collection: venv
	$(VENV)/bin/ansible-galaxy collection build --force --output-path dist .

# No network: the contract tests (FlagScale's own code, fetched from PyPI, reading what
# flagops renders) run in `make test` and `make test-contract`.
test-unit: setup
	$(PY) -m pytest tests/unit -n auto -m "not contract"

test-contract: setup
	$(PY) -m pytest tests/unit -n auto -m contract

# The whole suite: unit tests, then the lab (brought up here, torn down at the end,
# with a test that the tear-down left nothing), every role's molecule scenario,
# provision/deploy/verify end to end and the fault tests.
test: setup lint
	$(PY) -m pytest tests/unit -q -n auto
	$(MAKE) test-lab

test-lab: setup
	$(PY) -m pytest tests/integration -q -x -p no:cacheprovider -m "not slow"

# The slow proofs (a full PP=2 serving proof of the image, the fault tests that
# kill a container or a raylet and redeploy, the lab at 1 and 4 nodes): about 15 minutes
# more on the lab.
test-slow: setup
	$(PY) -m pytest tests/integration -q -p no:cacheprovider -m slow

# The README's newcomer path on the embedded default: the lab.
# The lab registry needs a login: the inventory reads its password from FLAGOPS_REGISTRY_PASSWORD.
LAB_REGISTRY_PASSWORD = $${FLAGOPS_HOME:-$$HOME/.flagops}/lab/registry-auth/password

quickstart: setup
	$(VENV)/bin/flagops lab up
	export FLAGOPS_REGISTRY_PASSWORD="$$(cat $(LAB_REGISTRY_PASSWORD))" && \
	  $(VENV)/bin/flagops provision inventories/lab.yaml && \
	  $(VENV)/bin/flagops deploy ernie45 && \
	  $(VENV)/bin/flagops verify

lab-down:
	$(VENV)/bin/flagops lab down
