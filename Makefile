# The README's two commands: `make figures` (the main job) and `make test` (the test suite).
.PHONY: env figures figures-qwen figures-qwen15 test bench lint

env:
	bash scripts/setup_env.sh

figures: env
	.venv/bin/python -m shortlab.run_notebooks --all --in-place --readme-findings

# notebook 01 on Qwen2.5-Coder-0.5B at the sizes of its stored evidence (results/shortgpt/qwen2.5-0.5b/),
# committed beside the default run: notebooks/runs/qwen2.5-0.5b/ and figures/qwen2.5-0.5b/; both Qwen targets
# only read their stores (a missing measurement stops the run and names the script that makes it)
# (QWEN_HEAL_SEEDS: the healing seeds its store holds)
QWEN_HEAL_SEEDS ?= [0, 1]
figures-qwen: env
	.venv/bin/python -m shortlab.run_notebooks notebooks/01_block_influence_pruning.ipynb \
		-p MODEL qwen2.5-0.5b -p EVAL_BLOCKS 96 -p LIMIT 300 -p HEAL_SEEDS "$(QWEN_HEAL_SEEDS)" \
		-p OPTIONS.measure_missing False \
		-p FIG_DIR figures/qwen2.5-0.5b --output-dir notebooks/runs/qwen2.5-0.5b --readme-findings

# notebook 01 on Qwen2.5-Coder-1.5B in bfloat16 at the sizes of its stored evidence
# (results/shortgpt/qwen2.5-1.5b/: four rankings and ten random draws at the table's k = 7, no healing)
figures-qwen15: env
	.venv/bin/python -m shortlab.run_notebooks notebooks/01_block_influence_pruning.ipynb \
		-p MODEL qwen2.5-1.5b -p DTYPE bfloat16 -p EVAL_BLOCKS 64 -p LIMIT 300 -p HEAL_SEEDS "[]" \
		-p RANKINGS '["block_influence", "reverse_order", "angular_distance", "relative_magnitude"]' \
		-p OPTIONS.max_remove 7 -p OPTIONS.remove_step 7 -p OPTIONS.random_draws 10 -p OPTIONS.measure_missing False \
		-p FIG_DIR figures/qwen2.5-1.5b --output-dir notebooks/runs/qwen2.5-1.5b --readme-findings

test: env
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

bench: env
	.venv/bin/python bench/run_all.py

lint: env
	.venv/bin/ruff check shortlab tests bench scripts notebooks
