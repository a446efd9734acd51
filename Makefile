# Developer entry points. CI runs .ci/run, which ends in `make test`.
# Every target that needs PostgreSQL first runs .ci/ensure-postgres, because a node
# runs its own cluster (src/embedded_pg.rs) and the tests start real ones.

CARGO    ?= cargo
# As root the node runs PostgreSQL as `postgres`, which must reach the data directory:
# from a checkout under a private home (such as /root) use /var/lib/cosmicsync instead.
DATA_DIR ?= $(shell if [ "$$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$(CURDIR)" 2>/dev/null; \
	then echo /var/lib/cosmicsync; else echo ./cosmicsync-data; fi)
ARGS     ?=
# `make cluster`: how many nodes, and where they keep their data (the same rule as DATA_DIR).
N        ?= 3
CLUSTER_DIR ?= $(shell if [ "$$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$(CURDIR)" 2>/dev/null; \
	then echo /var/lib/cosmicsync-cluster; else echo ./cosmicsync-cluster; fi)

.DEFAULT_GOAL := help
ensure-netlab: ## install what the namespace tests need (nftables, iptables, conntrack, miniupnpd; root and apt-get)
	.ci/ensure-netlab

ensure-interop: ## install the js-libp2p peer the interop test runs (npm ci in tests/interop/js)
	.ci/ensure-interop

.PHONY: help ensure-postgres ensure-netlab ensure-interop build run cluster cluster-stop test bench bench-reco bench-sync lint fmt clean

help: ## list the targets
	@echo 'Targets (variables: DATA_DIR=$(DATA_DIR), ARGS="extra cosmicsync start arguments"):'
	@awk 'BEGIN { FS = ":.*## " } /^[a-z-]+:.*## / { printf "  %-16s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

ensure-postgres: ## install PostgreSQL if it is missing (needs root and apt-get)
	.ci/ensure-postgres

build: ## release build of the cosmicsync binary
	$(CARGO) build --release

run: ensure-postgres build ## start a node with its data (and its PostgreSQL cluster) in DATA_DIR
	./target/release/cosmicsync start --data-dir "$(DATA_DIR)" $(ARGS)

cluster: ensure-postgres build ## start N nodes (default 3) of one network on this host, in CLUSTER_DIR
	./target/release/cosmicsync cluster start --nodes $(N) --dir "$(CLUSTER_DIR)" -- $(ARGS)

cluster-stop: ## stop the nodes `make cluster` started
	./target/release/cosmicsync cluster stop --dir "$(CLUSTER_DIR)"

# nextest runs each test in its own process, which keeps one test's stray cluster or
# panic from taking others down; plain cargo test is the fallback. The tests are built
# with fail points (Cargo feature `failpoints`) so they can make parts of a node die.
TEST_FEATURES ?= --features failpoints
test: ensure-postgres ensure-netlab ensure-interop ## run all tests (cargo nextest if installed, else cargo test)
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo '$(CARGO) nextest run --no-fail-fast $(TEST_FEATURES)'; \
		$(CARGO) nextest run --no-fail-fast $(TEST_FEATURES); \
	else \
		echo '$(CARGO) test --no-fail-fast $(TEST_FEATURES)'; \
		$(CARGO) test --no-fail-fast $(TEST_FEATURES); \
	fi

bench: ensure-postgres ## run the benchmarks (tests/bench/run.sh: API, recommendation batch, 30-node p2p network, replication)
	bash tests/bench/run.sh

bench-reco: ## run only the recommendation batch benchmark (tests/bench/reco.sh)
	bash tests/bench/run.sh reco

bench-sync: ensure-postgres ## run only the replication benchmark (tests/bench/sync.sh): propagation, catch-up, reconciliation bytes
	bash tests/bench/run.sh sync

lint: ## check formatting and run clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets $(TEST_FEATURES) -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

# Leaves DATA_DIR alone: it holds a node's identity and data, not build output.
clean: ## remove build output
	$(CARGO) clean
