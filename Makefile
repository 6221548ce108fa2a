# Single entry point. `make demo` runs the main job, `make test` runs every check CI runs.
# The cargo target folder lives outside the clone so that CI and later sessions reuse the
# (19-minute) engine build.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/mistralrs-kvplugin/target
KVPLUGIN := $(CARGO_TARGET_DIR)/release/kvplugin

.PHONY: setup demo test lint unit
setup:
	bash scripts/setup.sh

demo: setup
	$(KVPLUGIN) demo

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --profile release --locked -- -D warnings

test: setup lint
	bash scripts/test-summary.sh cargo test --workspace --profile release --locked
