# The two commands of the README. Both create or reuse .venv in the repository root.
.PHONY: demo test venv lint bench-quantize bench-memory bench-kernels bench-quality

venv:
	bash scripts/setup_venv.sh

demo: venv
	.venv/bin/python -m easyquant demo

test: venv
	.venv/bin/python -m pytest -q tests

lint: venv
	.venv/bin/ruff check src tests benchmarks

bench-quantize: venv
	.venv/bin/python benchmarks/bench_quantize.py

bench-memory: venv
	cd benchmarks && ../.venv/bin/python bench_memory.py --layers 8 --steps 5

bench-kernels: venv
	.venv/bin/python benchmarks/bench_kernels.py

bench-quality: venv
	.venv/bin/python benchmarks/quality.py
