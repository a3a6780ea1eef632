# The two commands of the README. Both set up a fresh machine first (idempotent).
#   make demo   the main job on a default that needs no Xen
#   make test   every test, the real-Xen test bed included (.ci/run calls exactly this)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup
demo: setup
	$(VENV)/bin/xapi-storage demo

test: setup
	scripts/setup.sh --testbed
	$(PY) -m pytest $(PYTEST_ARGS)

setup:
	scripts/setup.sh
