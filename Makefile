# The two commands of the README, and test-fast for the edit-test loop. Each sets up .venv first (scripts/setup.sh).
.PHONY: setup train train-reference test test-fast

setup:
	@bash scripts/setup.sh

# The demo: 60 steps on the cached engine, aimed at 3 minutes on 2 cores (deploy/jobs/tiny-sudoku-demo.toml).
train: setup
	.venv/bin/dlrl train deploy/jobs/tiny-sudoku-demo.toml

# The reference run: 150 steps on LLaDA's reference sampler, about 8 minutes (bench/tiny_sudoku.py's spec).
train-reference: setup
	.venv/bin/dlrl train deploy/jobs/tiny-sudoku.toml

# The full suite: ruff first (a lint failure stops it), then every test but the GPU ones.
# pytest exits 5 when it collected no test: that is a failure of the suite, said plainly.
test: setup
	.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The edit-test loop: the suite without the whole-job, chaos and compose tests (marked slow).
# This -m replaces the `-m 'not gpu'` of pyproject's addopts (the last -m wins), so it names gpu too.
test-fast: setup
	.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q -m 'not slow and not gpu'; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
