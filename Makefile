# Outpost: the two commands a newcomer needs are `make demo` and `make test`.
BUILD ?= build
ASAN_BUILD ?= build-asan
JOBS ?= $(shell nproc)
# -O2 without debug info: quicker to compile and link on CI's 2 cores.
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG"

.PHONY: deps build test test-unit test-asan demo demo-stop bench bench-build bench-agent bench-serve bench-telemetry bench-sim bench-relay format clean

deps:
	@scripts/install-deps

$(BUILD)/build.ninja: | deps
	cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

# Every test (unit, end-to-end, fuzz corpus), then the same again under ASan+UBSan.
test: test-unit test-asan

test-unit: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 300

$(ASAN_BUILD)/build.ninja: | deps
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DOUTPOST_SANITIZE=ON -DOUTPOST_BUILD_BENCH=OFF

test-asan: deps $(ASAN_BUILD)/build.ninja
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j $(JOBS) --timeout 600

demo: build
	scripts/demo

demo-stop:
	scripts/demo stop

bench-build: build
	cmake --build $(BUILD) -j $(JOBS) --target benchmarks

bench: bench-build
	bench/sync/run.sh
	bench/agent/footprint.sh
	BUILD=0 bench/serve/run.sh
	BUILD=0 bench/telemetry/run.sh
	bench/sim/run.sh

bench-agent: build
	bench/agent/footprint.sh

bench-serve: bench-build
	BUILD=0 bench/serve/run.sh

bench-telemetry: bench-build
	BUILD=0 bench/telemetry/run.sh

# Fleet figures with `outpost sim` (about 25 minutes): sync at 100,000 devices, convergence,
# reconnect storm, rollout overhead. One scenario: bench/sim/run.sh sync|converge|storm|rollout
bench-sim: build
	bench/sim/run.sh

bench-relay: build
	bench/relay/run.sh

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h')

clean:
	rm -rf $(BUILD) $(ASAN_BUILD)
