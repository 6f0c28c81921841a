# One entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
RUNS ?= 5

.PHONY: help setup images demo test test-rust test-python lint fmt notebooks schema bench clean-leftovers

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

setup: ## install what is missing: Docker engine, testbed images, the Python package
	bash testbeds/setup.sh

images: ## (re)build the testbed images only (the Python one from a fresh wheel of the package)
	cargo build --release --locked -q -p ms2m-service
	rm -f target/wheels/ms2m-*.whl
	maturin build --release -q -o target/wheels >/dev/null
	bash testbeds/images/build.sh target/release/ms2m-service

demo: setup ## the main job: migrate with both strategies RUNS times each, print the comparison
	$(PY) -m ms2m compare --runs $(RUNS)

test: setup lint test-rust test-python ## the whole suite: lint, Rust unit and Docker tests, pytest

test-rust:
	cargo test --release --locked --workspace --exclude ms2m-py

test-python: ## pytest (builds the Rust example service it runs first)
	cargo build --release --locked -q -p large-map
	$(PY) -m pytest -q -p no:cacheprovider --ms2m-require python/tests testbeds/experiments

lint: ## rustfmt, clippy (warnings are errors), ruff, stub check
	cargo fmt --all -- --check
	cargo clippy --release --locked --workspace --all-targets -q -- -D warnings
	$(PY) -m pip install -q --disable-pip-version-check --root-user-action=ignore "ruff>=0.6" "mypy>=1.10"
	$(PY) -m ruff check python
	$(PY) -m ruff format --check python
	$(PY) -m mypy.stubtest ms2m._native

fmt: ## format Rust and Python
	cargo fmt --all
	$(PY) -m ruff format python
	$(PY) -m ruff check --fix python

bench: setup ## benchmarks against a real broker: the instrument (generator, recorder), service rates, state sizes; the link relay's fidelity
	cargo bench --locked -p ms2m-engine --bench instrument
	cargo bench --locked -p ms2m-engine --bench rates
	cargo bench --locked -p ms2m-engine --bench sizes
	cargo bench --locked -p ms2m-engine --bench links

notebooks: setup ## execute the notebooks in place with full parameters (refreshes their outputs)
	$(PY) -m pip install -q --disable-pip-version-check --root-user-action=ignore ".[notebooks]"
	cd notebooks && $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=3600 *.ipynb

schema: ## regenerate python/ms2m/report.schema.json from the report types
	MS2M_WRITE_SCHEMA=1 cargo test --release --locked -q -p ms2m-engine --lib shipped_schema_is_current

clean-leftovers: ## remove containers, networks and local processes left by crashed runs
	$(PY) -m ms2m cleanup
