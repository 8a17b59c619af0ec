# The two commands a newcomer needs (see README.md):
#   make demo   set everything up and open the dashboard on the built-in demo cluster
#   make test   set everything up and run the tests
.PHONY: setup demo test lint bench

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/torbiz-tui -c configs/demo.toml

test:
	scripts/setup.sh --with-test-tools
	.venv/bin/lint-imports
	.venv/bin/python -m pytest -q -ra

lint: setup
	.venv/bin/ruff check core tui tests bench
	.venv/bin/mypy
	.venv/bin/lint-imports

bench: setup
	.venv/bin/python bench/bringup.py
	.venv/bin/python bench/overhead.py
	.venv/bin/python bench/placement.py
