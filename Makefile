# The two commands of the README. Both install what a fresh machine lacks first.
.PHONY: dev test setup lint fuzz

# The whole local stack: the edge, the reference runtime, an agent and a key. `moltghost dev`
# starts the edge and the runtime binaries that sit beside it, so all of them are built first.
dev: setup
	cargo build --release --workspace --bins
	cargo run --release --bin moltghost -- dev

# Everything CI runs: formatting, lints, the test suites, and a fuzz smoke run.
test: setup lint
	# The integration tests run the CLI and the pod binaries, which `cargo test` builds only as
	# test harnesses: build the binaries themselves first.
	cargo build --workspace --bins
	cargo test --workspace --all-targets
	WITH_FUZZ=1 ./scripts/setup.sh
	./scripts/fuzz-smoke.sh

setup:
	@./scripts/setup.sh

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
