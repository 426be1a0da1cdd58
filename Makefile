# The two commands of the README. Each does all set-up on a fresh machine first (scripts/setup.sh).
.PHONY: setup test test-quick demo lint bench

setup:
	bash scripts/setup.sh

# Every CPU test, the multi-process, kill -9 and real-data ones included: 571 tests, 20 minutes on two cores that a
# fine-tune was sharing (fewer on idle cores). The slowest tests are listed at the end of the run.
test: setup
	.venv/bin/python -m pytest -q -m "not gpu" --durations=15

# Without the subprocess-heavy tests (kill -9 / Ctrl-C resume, accelerate launch with two processes).
test-quick: setup
	.venv/bin/python -m pytest -q -m "not slow and not gpu"

demo: setup
	.venv/bin/mr2ft demo

lint: setup
	.venv/bin/ruff check mr2ft tests benchmarks && .venv/bin/ruff format --check mr2ft tests benchmarks

bench: setup
	.venv/bin/python benchmarks/loss_overhead.py | tee benchmarks/loss_overhead.txt
	.venv/bin/python benchmarks/probe_cost.py | tee benchmarks/probe_cost.txt
	.venv/bin/python benchmarks/finetune_throughput.py | tee benchmarks/finetune_throughput.txt
	.venv/bin/python benchmarks/finetune_switches.py | tee benchmarks/finetune_switches.txt
	.venv/bin/python benchmarks/feature_store_memory.py | tee benchmarks/feature_store_memory.txt
