# The two commands of the README: `make demo` and `make test`.
.PHONY: setup setup-demo demo test lint

setup:
	./scripts/setup.sh full

setup-demo:
	./scripts/setup.sh demo

demo: setup-demo
	.venv/bin/aiolm demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check .
