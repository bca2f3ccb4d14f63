# flagops developer entry points. `make setup` works offline except for PyPI (Galaxy is
# unreachable, so the collections come out of the PyPI `ansible` wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ANSIBLE_BUNDLE_VERSION ?= 12.3.0
WHEEL_CACHE ?= .cache/wheels
COLLECTIONS_DIR := .ansible/collections/ansible_collections
COLLECTIONS := community/docker ansible/posix

.PHONY: setup venv collections test-unit test test-lab test-slow quickstart lab-down

setup: venv collections

venv: $(VENV)/.flagops-installed

$(VENV)/.flagops-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]'
	touch $@

# Idempotent: a collection already unpacked (its MANIFEST.json present) is skipped, and
# the 50 MB wheel is downloaded once into $(WHEEL_CACHE).
collections: venv
	@set -e; missing=""; \
	for c in $(COLLECTIONS); do \
	  test -f $(COLLECTIONS_DIR)/$$c/MANIFEST.json || missing="$$missing $$c"; \
	done; \
	if [ -z "$$missing" ]; then echo "collections present: $(COLLECTIONS)"; exit 0; fi; \
	whl=$$(ls $(WHEEL_CACHE)/ansible-$(ANSIBLE_BUNDLE_VERSION)-*.whl 2>/dev/null | head -n1); \
	if [ -z "$$whl" ]; then \
	  $(PIP) download --no-deps --only-binary=:all: -d $(WHEEL_CACHE) ansible==$(ANSIBLE_BUNDLE_VERSION); \
	  whl=$$(ls $(WHEEL_CACHE)/ansible-$(ANSIBLE_BUNDLE_VERSION)-*.whl | head -n1); \
	fi; \
	for c in $$missing; do \
	  echo "extracting $$c from $$whl"; \
	  $(PY) -c 'import sys, zipfile, pathlib; \
	whl, coll, dest = sys.argv[1:]; prefix = "ansible_collections/" + coll + "/"; \
	z = zipfile.ZipFile(whl); names = [n for n in z.namelist() if n.startswith(prefix)]; \
	assert names, "no " + prefix + " in " + whl; \
	z.extractall(dest, names)' "$$whl" "$$c" .ansible/collections; \
	done

test-unit: venv
	$(PY) -m pytest tests/unit

# The whole suite: unit tests, then the lab (brought up here, torn down at the end,
# with a test that the tear-down left nothing), every role's molecule scenario,
# provision/deploy/verify end to end and the fault tests.
test: setup
	$(PY) -m pytest tests/unit -q
	$(MAKE) test-lab

test-lab: setup
	$(PY) -m pytest tests/integration -q -x -p no:cacheprovider -m "not slow"

# The slow proofs (a full PP=2 serving proof of the image, and the fault tests that
# kill a container or a raylet and redeploy): about 10 minutes more on the lab.
test-slow: setup
	$(PY) -m pytest tests/integration -q -p no:cacheprovider -m slow

# The README's newcomer path on the embedded default: the lab.
quickstart: setup
	$(VENV)/bin/flagops lab up
	$(VENV)/bin/flagops provision inventories/lab.yaml
	$(VENV)/bin/flagops deploy ernie45
	$(VENV)/bin/flagops verify

lab-down:
	$(VENV)/bin/flagops lab down
