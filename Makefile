# The two commands of the README. Each does all set-up on a fresh machine first (scripts/setup.sh).
.PHONY: setup test test-all demo lint bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q -m "not slow and not gpu"

test-all: setup
	.venv/bin/python -m pytest -q -m "not gpu"

demo: setup
	.venv/bin/mr2ft demo

lint: setup
	.venv/bin/ruff check mr2ft tests benchmarks && .venv/bin/ruff format --check mr2ft tests benchmarks

bench: setup
	.venv/bin/python benchmarks/loss_overhead.py | tee benchmarks/loss_overhead.txt
