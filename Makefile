# The README's two commands: `make figures` (the main job) and `make test` (the test suite).
.PHONY: env figures figures-qwen test bench lint

env:
	bash scripts/setup_env.sh

figures: env
	.venv/bin/python -m shortlab.run_notebooks --all --in-place --readme-findings

# notebook 01 on Qwen2.5-0.5B at the sizes of its stored evidence (results/shortgpt/qwen2.5-0.5b/),
# committed beside the default run: notebooks/runs/qwen2.5-0.5b/ and figures/qwen2.5-0.5b/
figures-qwen: env
	.venv/bin/python -m shortlab.run_notebooks notebooks/01_block_influence_pruning.ipynb \
		-p MODEL qwen2.5-0.5b -p EVAL_BLOCKS 96 -p LIMIT 300 -p FIG_DIR figures/qwen2.5-0.5b \
		--output-dir notebooks/runs/qwen2.5-0.5b --readme-findings

test: env
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

bench: env
	.venv/bin/python bench/run_all.py

lint: env
	.venv/bin/ruff check shortlab tests bench scripts notebooks
