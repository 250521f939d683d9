"""Benchmark peers: the programs the benchmark runs inside the lab.

- `bench_tools`: the origin server (bulk source, upload sink, echo) and the clients
  (bulk download, upload, duplex echo, RTT) that drive and time every run.
- `splice_proxy`: an L4 proxy moving bytes with splice(2) through a pipe.
- `asyncio_proxy`: an L4 proxy with asyncio streams (recv/send through user space).
- `haproxy.cfg.tmpl`, `nginx.conf.tmpl`: configuration templates (string.Template).

Everything here is standard library only, so it runs with any python3 inside a
namespace.
"""
