# Two entry points for a fresh machine (see README): `make demo` and `make test`.
.PHONY: setup setup-dev demo test test-demo bench

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

demo: setup
	.venv/bin/federimed demo

test: setup-dev
	.venv/bin/python -m pytest -ra

test-demo: setup-dev
	.venv/bin/python -m pytest -ra -m demo tests/test_demo_quick.py

bench: setup-dev
	for b in bench/*.py; do .venv/bin/python $$b || exit 1; done
