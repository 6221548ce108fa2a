# Single entry point. `make demo` runs the main job, `make test` runs every check CI runs.
# The cargo target folder lives outside the clone so that CI and later sessions reuse the
# (20-minute) engine build.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/mistralrs-kvplugin/target
KVPLUGIN := $(CARGO_TARGET_DIR)/release/kvplugin

.PHONY: setup setup-tests demo test lint engine-features
# What the demo needs: the patched engine, the model, the workspace build.
setup:
	bash scripts/setup.sh

# What the tests need on top: the S3 servers they start.
setup-tests:
	bash scripts/setup.sh --tests

demo: setup
	$(KVPLUGIN) demo

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --profile release --locked -- -D warnings

# The engine patch keeps the stock engine with its features off (`cargo check`, no kv-hooks).
engine-features: setup
	bash scripts/check-engine-features.sh

test: setup-tests lint engine-features
	bash scripts/test-summary.sh cargo test --workspace --profile release --locked
