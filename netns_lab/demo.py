"""`make lab`: the lab with a spliced L4 proxy, and a request through it.

Builds the three namespaces, starts an HTTP origin (Python's http.server over a 32 MiB
file of random bytes), starts `nfsplice tcp` in the proxy namespace with the tap on,
fetches the file with curl from the client namespace through the splice, and shows
that the bytes are right, that the engine (not the proxy's sockets) carried them, what
the tap stored, and that no rule is left afterwards.

    python -m netns_lab.demo [--size 32MiB] [--keep]   (--keep: leave the lab up)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_size(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="32MiB")
    ap.add_argument("--keep", action="store_true", help="leave the lab running (Ctrl-C to end)")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="nfsplice-lab-")
    www = os.path.join(work, "www")
    os.makedirs(www)
    body = os.urandom(size)
    with open(os.path.join(www, "object.bin"), "wb") as f:
        f.write(body)
    want = hashlib.sha256(body).hexdigest()
    tap = os.path.join(work, "tap")
    ready = os.path.join(work, "ready")
    procs = []
    rc = 1
    with Lab("lab") as lab:
        try:
            print(f"lab: client {lab.client}, proxy {lab.proxy}, origin {lab.origin} (198.18.0.0/15)")
            procs.append(lab.popen(lab.origin, sys.executable, "-m", "http.server", "--bind", ORIGIN_ADDR,
                                   "--directory", www, "8000", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            splicer = lab.popen(lab.proxy, sys.executable, "-m", "nfsplice", "tcp",
                                "--listen", f"{PROXY_CLIENT_ADDR}:8080", "--upstream", f"{ORIGIN_ADDR}:8000",
                                "--instance", "lab", "--tap-dir", tap, "--ready-file", ready, "--linger", "1",
                                cwd=REPO)
            procs.append(splicer)
            deadline = time.monotonic() + 20
            while not os.path.exists(ready):
                if splicer.poll() is not None or time.monotonic() > deadline:
                    print("nfsplice did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            time.sleep(0.3)   # http.server binds
            url = f"http://{PROXY_CLIENT_ADDR}:8080/object.bin"
            print(f"\n$ curl {url}   (in {lab.client}, through the splice)")
            t0 = time.monotonic()
            out = lab.run(lab.client, "curl", "-sS", "--max-time", "60", "-o", "-", url)
            dt = time.monotonic() - t0
            got = hashlib.sha256(out.stdout).hexdigest()
            ok = got == want and len(out.stdout) == size
            print(f"received {len(out.stdout)} bytes in {dt:.2f} s ({len(out.stdout) * 8 / dt / 1e9:.2f} Gbit/s), "
                  f"sha256 {'matches' if ok else 'DIFFERS'}")
            time.sleep(2)   # linger, so the pair is done and the tap closed
            print("\n$ nfsplice stats --instance lab")
            print(subprocess.run([sys.executable, "-m", "nfsplice", "stats", "--instance", "lab"], cwd=REPO,
                                 capture_output=True, text=True).stdout)
            for name in sorted(os.listdir(tap)):
                if name.endswith(".json"):
                    with open(os.path.join(tap, name)) as f:
                        meta = json.load(f)
                    print(f"tap {meta['direction']}: {meta['length']} bytes, complete={meta['complete']}")
            if args.keep:
                print(f"\nlab is up: try  ip netns exec {lab.client} curl {url}  (Ctrl-C ends)")
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
            rc = 0 if ok else 1
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            left = lab.run(lab.proxy, "iptables-save", "-t", "raw").stdout.decode()
            print("\nrules left after exit:", "none" if "NFSPLICE" not in left else left)
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
