# The README's two commands: `make figures` (the main job) and `make test` (the test suite).
.PHONY: env figures test bench lint

env:
	bash scripts/setup_env.sh

figures: env
	.venv/bin/python -m shortlab.run_notebooks --all --in-place

test: env
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

bench: env
	.venv/bin/python bench/run_all.py

lint: env
	.venv/bin/ruff check shortlab tests bench scripts notebooks
