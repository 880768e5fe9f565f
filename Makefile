# tunnelpass: `make demo` runs a tunnel (server + client) end to end on loopback,
# `make test` runs the whole test suite, `make bench` the benchmark.
# The first target used creates .venv and installs the project into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-forward test bench bench-forward bench-tunnel bench-udp fuzz clean

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

test: $(STAMP)
	$(PY) -m twisted.trial tests

bench: bench-forward bench-tunnel bench-udp

bench-forward: $(STAMP)
	bash bench/run.sh bench.py

bench-tunnel: $(STAMP)
	bash bench/run.sh tunnel_bench.py

bench-udp: $(STAMP)
	bash bench/run.sh udp_bench.py

fuzz: $(STAMP)
	$(PY) -m pip install -q atheris==3.0.0
	for target in rules frames handshake url token key gate; do \
	  $(PY) fuzz/fuzz_parsers.py $$target -max_total_time=$${FUZZ_SECONDS:-60} -print_final_stats=1 || exit 1; \
	done

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info twisted/plugins/dropin.cache
