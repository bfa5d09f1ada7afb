# Common tasks. `make help` lists them.
.PHONY: help test services e2e ci lint crds tools manifests bench demo images

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

test: services tools ## the whole test suite: starts the local servers it needs, installs its tools, runs every test
	cargo test --workspace

services: ## start the local servers the tests use (Redis, RabbitMQ, …) where none answers
	bash -c 'source .ci/services.sh && ensure_services'

e2e: ## the operator against the real cluster IDEMQ_E2E_KUBECONFIG names (builds the operator first)
	cargo build -p idemq-operator
	cargo test -p idemq-tests --test e2e_cluster -- --ignored --nocapture --test-threads=1

ci: ## what CI runs: services, fmt, clippy, tests, manifests, benchmark smoke
	bash .ci/run

lint: ## formatting and clippy
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

crds: ## regenerate the CRD YAML (crds/ and the chart's copy) from the Rust types
	cargo run -q -p idemq-operator -- crd | tee crds/idempotentconsumers.idemq.dev.yaml \
	  charts/idemq/files/crds/idempotentconsumers.idemq.dev.yaml > /dev/null

tools: ## install helm, kubernetes-validate and cel-python into .tools/
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
