# nfsplice: `make setup` once (as root: Debian packages and .venv), then `make lab`, `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# haproxy, nginx and its stream module, varnish and squid are benchmark peers (and their smoke test runs in make test).
# clang, libbpf-dev and bpftool build and load the tc-BPF fast path (nfsplice/fastpath/).
APT_PACKAGES := nftables iptables libnetfilter-queue-dev tcpdump iproute2 gcc curl \
	clang libbpf-dev bpftool haproxy nginx libnginx-mod-stream wrk varnish squid

.PHONY: setup apt venv cache-tests lab test unit bench cleanup clean

setup: apt venv cache-tests

apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; fi
	@# The Debian packages start system services; nfsplice's tests run their own.
	-@systemctl disable --now nginx haproxy varnish varnishncsa squid >/dev/null 2>&1 || true

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,netfilterqueue]'
	touch $@

# The public HTTP cache test suite (npm http-cache-tests, pinned in netns_lab/cache_conformance.py),
# installed into netns_lab/cache-tests/ (git-ignored); Node.js and npm from Debian when missing.
cache-tests: venv
	@if ! command -v npm >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; fi
	$(PY) -m netns_lab.cache_conformance --install-only

# The lab with a spliced L4 proxy and a transfer through it (see netns_lab/demo.py).
lab: setup
	$(PY) -m netns_lab.demo

test: setup
	$(PY) -m pytest -q -ra tests

unit: venv
	$(PY) -m pytest -q -m 'not root' tests

bench: setup
	$(PY) -m netns_lab.bench

cleanup: venv
	$(PY) -m nfsplice cleanup

clean:
	rm -rf $(VENV) build *.egg-info
