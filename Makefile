# The two commands of the README. Both install what a fresh machine lacks first (.ci/setup).
PYTHON ?= python3

.PHONY: setup demo test
setup:
	@bash .ci/setup

demo: setup
	vmcast demo

test: setup
	$(PYTHON) -m pytest -q
