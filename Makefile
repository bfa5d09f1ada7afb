# Common tasks. `make help` lists them.
.PHONY: help test ci lint crds tools manifests bench demo images

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

test: tools ## the whole test suite (needs Redis and RabbitMQ on loopback)
	cargo test --workspace

ci: ## what CI runs: services, fmt, clippy, tests, manifests, benchmark smoke
	bash .ci/run

lint: ## formatting and clippy
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

crds: ## regenerate the CRD YAML (crds/ and the chart's copy) from the Rust types
	cargo run -q -p idemq-operator -- crd | tee crds/idempotentconsumers.idemq.dev.yaml \
	  charts/idemq/files/crds/idempotentconsumers.idemq.dev.yaml > /dev/null

tools: ## install helm and kubernetes-validate into .tools/
	bash .ci/tools.sh

manifests: tools ## helm lint/template and offline schema validation of every manifest
	cargo build -q -p idemq-operator
	bash .ci/manifests.sh

bench: ## the full benchmark (100,000 messages)
	cargo run --release -p idemq-bench -- --messages 100000

demo: ## publish messages with duplicates through the sidecar; print what the app saw
	cargo run --release -p idemq-bench -- demo

images: ## the operator and sidecar images
	docker build --target operator -t idemq-operator .
	docker build --target sidecar -t idemq-sidecar .
