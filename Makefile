SHELL := bash
GO ?= go
BIN := bin/agentmesh
# The PKCS#11 KMS compiles only with cgo.
export CGO_ENABLED := 1

# golangci-lint as scripts/deps.sh installs it (pinned there).
GOLANGCI_LINT ?= $(shell $(GO) env GOPATH)/bin/golangci-lint

.PHONY: deps build test test-short check check-static fuzz demo bench bench-micro clean

## deps: install missing system packages (softhsm2, opensc, iptables, curl, ...), Go modules and the step CLI;
## a quick no-op when everything is present, so test and demo run it first
deps:
	@scripts/deps.sh

## build: build bin/agentmesh
build:
	$(GO) build -o $(BIN) ./cmd/agentmesh

## test: unit and end-to-end tests with the race detector; the end-to-end tests run on
## their own afterwards, so that their short-lived certificates are not starved of CPU
test: deps
	$(GO) test -race -shuffle=on -count=1 -timeout 20m $$($(GO) list ./... | grep -v /e2e$$)
	$(GO) test -race -shuffle=on -count=1 -timeout 30m -v ./e2e/ 2>&1 | grep -v 'level=DEBUG'; exit $${PIPESTATUS[0]}

## test-short: unit tests only
test-short:
	$(GO) test -race -short -count=1 ./...

## check-static: formatting, vet, golangci-lint (.golangci.yml; installed by make deps) and
## the package dependency rules, over the root module and bench/ (a module of its own, so
## ./... of the root does not reach it)
check-static:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) -C bench vet ./...
	@[ -x "$(GOLANGCI_LINT)" ] || { echo "golangci-lint missing: run make deps"; exit 1; }
	$(GOLANGCI_LINT) run ./...
	cd bench && $(GOLANGCI_LINT) run --config ../.golangci.yml ./...
	@scripts/depcheck.sh

## check: check-static then test
check: check-static test

## fuzz: a short run of every fuzz target
fuzz:
	@scripts/fuzz.sh $${FUZZTIME:-20s}

## demo: a CA with SoftHSM, two proxies, a service and a client loop; DEMO_DURATION=90s stops it;
## exits non-zero when a request that should succeed fails or one that should be refused succeeds
demo: deps build
	@scripts/demo.sh

## bench: what the mesh costs a connection, a request and a gigabyte, per transport, against
## no proxy and a plain crypto/tls relay, and the control paths' timing targets (revocation,
## drain), and the audit path's cost (tls-full against tls-full-queued and tls-full-nocheckpoint):
## bench/results/{results.md,chart.png}; BENCH_QUICK=1 for a run of about a minute.
## bench/ is its own module, so it runs from there
bench:
	$(GO) -C bench run ./cmd/meshbench

## bench-micro: Go benchmarks (audit log, full versus resumed connection, durable versus queued
## audit acknowledgement: BenchmarkAuditAck), -count=6 for benchstat
bench-micro:
	$(GO) test -run='^$$' -bench=. -benchmem -count=6 ./audit/ ./proxy/

clean:
	rm -rf bin
