# The two commands of the README. Both set up .venv first (see scripts/setup.sh).
.PHONY: setup train test

setup:
	@bash scripts/setup.sh

train: setup
	.venv/bin/dlrl train deploy/jobs/tiny-sudoku.toml

# The full suite: ruff first (a lint failure stops it), then every test but the GPU ones.
# pytest exits 5 when it collected no test: that is a failure of the suite, said plainly.
test: setup
	.venv/bin/ruff check .
	@.venv/bin/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
