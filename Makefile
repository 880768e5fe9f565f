# tunnelpass: `make demo` runs a tunnel (server + client) end to end on loopback,
# `make test` runs the whole test suite, `make bench` the benchmark.
# The first target used creates .venv and installs the project into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-forward test coverage bench bench-forward bench-tunnel bench-udp bench-master fuzz screenshots clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# compat mode puts the checkout on sys.path, so twistd finds
	# twisted/plugins/tunnelpass_plugin.py (a PEP 660 finder would hide it).
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

demo: $(STAMP)
	$(PY) -m tunnelpass.demo

demo-forward: $(STAMP)
	$(PY) -m tunnelpass.demo --forward

# Two phases: everything in JOBS parallel trial workers (most e2e tests wait
# on subprocesses and sockets), with the load tests skipped; then the load
# tests alone, so their bounds measure tunnelpass, not a neighbour's load.
# `python -m twisted.trial tests` alone runs the whole suite serially too.
JOBS ?= 2
LOAD_TESTS := tests.e2e.test_udp_tunnel_e2e.SessionChurnTests tests.e2e.test_admission_e2e tests.e2e.test_fd_limit_e2e

test: $(STAMP)
	@status=0; \
	TP_TEST_PHASE=parallel $(PY) -m twisted.trial -j$(JOBS) tests || status=1; \
	$(PY) -m twisted.trial --temp-directory=_trial_temp_load $(LOAD_TESTS) || status=1; \
	exit $$status

# The dashboard's screenshots in docs/ (README), taken by its browser test
# (needs playwright and /usr/bin/chromium).
screenshots: $(STAMP)
	TP_SCREENSHOTS=docs $(PY) -m twisted.trial --temp-directory=_trial_temp_screenshots \
	  tests.browser.test_dashboard_browser.FormAndTrafficTests

# Unit-test coverage (tests/test_*.py, not the e2e layer: subprocesses are
# not measured) of the tunnel ends.  coverage is installed here, on first
# use, so that `make test` and the venv stamp do not depend on it.
COVERAGE_DIR     := _trial_temp_coverage
COVERAGE_INCLUDE ?= tunnelpass/tunnel/client*.py,tunnelpass/tunnel/server*.py,tunnelpass/tunnel/gate.py
UNIT_TESTS        = $(patsubst %.py,%,$(subst /,.,$(wildcard tests/test_*.py)))

coverage: $(STAMP)
	@$(PY) -c 'import coverage' 2>/dev/null || $(PY) -m pip install -q 'coverage>=7'
	@mkdir -p $(COVERAGE_DIR)
	$(PY) -m coverage run --data-file=$(COVERAGE_DIR)/.coverage --source=tunnelpass \
	  -m twisted.trial --temp-directory=$(COVERAGE_DIR)/trial $(UNIT_TESTS)
	$(PY) -m coverage report --data-file=$(COVERAGE_DIR)/.coverage --include='$(COVERAGE_INCLUDE)' --show-missing

bench: bench-forward bench-tunnel bench-udp bench-master

bench-forward: $(STAMP)
	bash bench/run.sh bench.py

# BENCH_ARGS: options of the benchmark script, e.g. BENCH_ARGS="--quick --only http,rss" (a smoke run).
bench-tunnel: $(STAMP)
	bash bench/run.sh tunnel_bench.py $(BENCH_ARGS)

bench-udp: $(STAMP)
	bash bench/run.sh udp_bench.py $(BENCH_ARGS)

# The master: RSS with 100 idle instances, GET /instances latency, POST -> traffic.
bench-master: $(STAMP)
	$(PY) bench/master_bench.py $(BENCH_ARGS)

fuzz: $(STAMP)
	$(PY) -m pip install -q atheris==3.0.0
	for target in rules frames handshake url token key gate; do \
	  $(PY) fuzz/fuzz_parsers.py $$target -max_total_time=$${FUZZ_SECONDS:-60} -print_final_stats=1 || exit 1; \
	done
	for target in acceptor opener headers; do \
	  $(PY) fuzz/fuzz_mux.py $$target -max_total_time=$${FUZZ_SECONDS:-60} -print_final_stats=1 || exit 1; \
	done

clean:
	rm -rf $(VENV) _trial_temp _trial_temp_load _trial_temp_coverage _trial_temp_screenshots build *.egg-info twisted/plugins/dropin.cache
