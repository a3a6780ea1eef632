# The two commands of the README. Both set up a fresh machine first (idempotent).
#   make demo   the main job on a default that needs no Xen
#   make test   every test, the real-Xen test bed included, on the default python3; and the
#               fast tests on CPython 3.6 and 3.12 from pyenv alongside (scripts/test-all.sh;
#               .ci/run calls exactly this)
VENV ?= .venv

.PHONY: demo test setup
demo: setup
	$(VENV)/bin/xapi-storage demo

test: setup
	scripts/setup.sh --testbed
	VENV=$(VENV) scripts/test-all.sh $(PYTEST_ARGS)

setup:
	scripts/setup.sh
