"""The public HTTP cache test suite (npm `http-cache-tests`) against nfsplice's cache.

    .venv/bin/python -m netns_lab.cache_conformance [--json results.json] [--id TEST-ID]

In the lab (DESIGN.md's three namespaces): the suite's own test server is the origin
(node, origin namespace, port 8000), `nfsplice http` a caching reverse proxy for it
(proxy namespace, 198.18.1.1:8080, splicing as usual), and the suite's command-line
client runs every test against the proxy from the client namespace (`cli.mjs`, base URL
http://198.18.1.1:8080).  The client prints a JSON object: test id -> true, or
[error kind, message].

The score is computed as the suite's own result page does (lib/display.mjs
`determineTestResult`): a test whose dependency did not pass is "dependency" (not
counted as failed), a setup error is "setup", then by kind: required (pass / fail),
optimal (pass / optional fail), check (yes / no).  Browser-only tests are not run.
`score()` returns the counts and the ids per outcome; `main` prints them and the
failed tests' names and messages.

The package is installed, pinned, into netns_lab/cache-tests/ (git-ignored) by
`ensure_installed`, from the npm registry; `make setup` does it once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from netns_lab.origins import REPO
from netns_lab.topology import ORIGIN_ADDR, PROXY_CLIENT_ADDR, Lab

PACKAGE = "http-cache-tests"
VERSION = "0.4.5"
INSTALL_DIR = REPO / "netns_lab" / "cache-tests"
ORIGIN_PORT = 8000
PROXY_PORT = 8080
PREFIX = "cct"

# Groups in which the issue allows no failure: name -> test id predicate.
STRICT_GROUPS = {
    "no-store": lambda t: t["id"].startswith("cc-resp-no-store"),
    "private": lambda t: t["id"].startswith("cc-resp-private"),
    "Authorization": lambda t: t["suite"] == "auth",
    "Vary": lambda t: t["suite"] in ("vary", "vary-parse"),
    "304 updates": lambda t: t["suite"] == "update304",
    "invalidation": lambda t: t["suite"] == "invalidation",
}

_LIST_TESTS = """
const base = process.argv[1]
const tests = (await import(base + '/tests/index.mjs')).default
tests.push((await import(base + '/tests/surrogate-control.mjs')).default)
const out = []
for (const suite of tests) for (const t of suite.tests) {
  out.push({suite: suite.id, id: t.id, name: t.name, kind: t.kind || 'required',
            depends_on: t.depends_on || [], browser_only: t.browser_only === true})
}
console.log(JSON.stringify(out))
"""


def package_dir(install_dir: Path = INSTALL_DIR) -> Path:
    return install_dir / "node_modules" / PACKAGE


def installed_version(install_dir: Path = INSTALL_DIR) -> str | None:
    try:
        return json.loads((package_dir(install_dir) / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_installed(install_dir: Path = INSTALL_DIR) -> Path:
    """Install PACKAGE@VERSION with npm into INSTALL_DIR unless it is there already."""
    if installed_version(install_dir) == VERSION:
        return package_dir(install_dir)
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the cache conformance suite needs Node.js and npm")
    install_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["npm", "install", "--prefix", str(install_dir), "--no-audit", "--no-fund",
                        "--no-save", "--loglevel=error", f"{PACKAGE}@{VERSION}"],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0 or installed_version(install_dir) != VERSION:
        raise RuntimeError(f"npm install {PACKAGE}@{VERSION} failed ({p.returncode}): "
                           f"{(p.stderr or p.stdout).strip()[-2000:]}")
    return package_dir(install_dir)


def list_tests(pkg: Path) -> list[dict]:
    p = subprocess.run(["node", "--input-type=module", "-e", _LIST_TESTS, str(pkg)],
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(p.stdout)


def outcome(tests: dict, results: dict, tid: str) -> str:
    """lib/display.mjs determineTestResult, as words: pass, fail, optional_fail, yes,
    no, setup, retry, dependency, untested."""
    t = tests[tid]
    r = results.get(tid)
    if r is None:
        return "untested"
    for dep in t["depends_on"]:
        if outcome(tests, results, dep) not in ("pass", "yes"):
            return "dependency"
    if isinstance(r, list) and r and r[0] == "Setup":
        return "retry" if len(r) > 1 and r[1] == "retry" else "setup"
    if t["kind"] == "required":
        return "pass" if r is True else "fail"
    if t["kind"] == "optimal":
        return "pass" if r is True else "optional_fail"
    return "yes" if r is True else "no"


def score(test_list: list[dict], results: dict) -> dict:
    """Counts per kind and outcome, the ids per outcome of the required tests, and the
    required tests that failed in each STRICT_GROUPS group."""
    tests = {t["id"]: t for t in test_list}
    run = [t for t in test_list if not t["browser_only"]]
    out = {"required": Counter(), "optimal": Counter(), "check": Counter(), "ids": {}, "groups": {}}
    for t in run:
        o = outcome(tests, results, t["id"])
        out[t["kind"]][o] += 1
        if t["kind"] == "required":
            out["ids"].setdefault(o, []).append(t["id"])
    failed = set(out["ids"].get("fail", []))
    for name, pred in STRICT_GROUPS.items():
        out["groups"][name] = sorted(t["id"] for t in run if pred(t) and t["id"] in failed)
    out["total_required"] = sum(out["required"].values())
    out["passed"] = out["required"]["pass"]
    return out


def report(test_list: list[dict], results: dict, sc: dict) -> str:
    names = {t["id"]: t["name"] for t in test_list}
    req = sc["required"]
    lines = [f"http-cache-tests {VERSION}: {sc['passed']} of {sc['total_required']} required tests passed "
             f"({req['fail']} failed, {req['dependency']} not run for a failed dependency, "
             f"{req['setup'] + req['retry']} setup, {req['untested']} untested); "
             f"optimal {sc['optimal']['pass']} passed, {sc['optimal']['optional_fail']} not; "
             f"checks {sc['check']['yes']} yes, {sc['check']['no']} no"]
    for o in ("fail", "setup", "retry", "dependency"):
        for tid in sc["ids"].get(o, []):
            r = results.get(tid)
            msg = r[1] if isinstance(r, list) and len(r) > 1 else ""
            lines.append(f"  {o:10} {tid}: {names[tid]}" + (f" -- {msg}" if msg and o != "dependency" else ""))
    for g, ids in sc["groups"].items():
        lines.append(f"  group {g}: {'no failure' if not ids else 'FAILED ' + ', '.join(ids)}")
    return "\n".join(lines)


def _node_env(**config) -> dict:
    """What `npm run --KEY=VALUE` would set: the scripts read npm_config_KEY, falling
    back to the package's own config (npm_package_config_KEY) when it is empty."""
    env = dict(os.environ)
    for k, v in config.items():
        env[f"npm_config_{k}"] = env[f"npm_package_config_{k}"] = str(v)
    return env


def run(test_id: str = "", keep: bool = False, proxy_args: tuple = ()) -> tuple[list[dict], dict, str]:
    """The suite against nfsplice in a fresh lab: (the test list, results, what the
    client printed on stderr or, with TEST_ID, the request/response dump)."""
    pkg = ensure_installed()
    test_list = list_tests(pkg)
    work = Path(tempfile.mkdtemp(prefix="nfsplice-cct-"))
    with Lab(PREFIX) as lab:
        server_log = open(work / "origin.log", "w")
        origin = lab.popen(lab.origin, "node", "--no-warnings", "server/server.mjs", cwd=pkg,
                           env=_node_env(protocol="http", port=ORIGIN_PORT, pidfile=work / "origin.pid"),
                           stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        proxy = None
        try:
            _wait_listening(lab, lab.origin, ORIGIN_PORT, origin, work / "origin.log")
            ready = work / "ready"
            proxy_log = open(work / "proxy.log", "w")
            proxy = lab.popen(lab.proxy, sys.executable, "-m", "nfsplice", "http",
                              "--listen", f"{PROXY_CLIENT_ADDR}:{PROXY_PORT}",
                              "--upstream", f"http://{ORIGIN_ADDR}:{ORIGIN_PORT}",
                              "--cache-dir", str(work / "cache"), "--instance", "cct-conformance",
                              "--access-log", str(work / "access.log"), "--ready-file", str(ready),
                              *proxy_args, cwd=REPO, stdout=proxy_log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nfsplice did not start: {(work / 'proxy.log').read_text()[-2000:]}")
                time.sleep(0.05)
            client = lab.run(lab.client, "node", "--no-warnings", "cli.mjs", cwd=pkg, check=False, timeout=900,
                             env=_node_env(base=f"http://{PROXY_CLIENT_ADDR}:{PROXY_PORT}", id=test_id))
            out = client.stdout.decode(errors="replace")
            if test_id:
                return test_list, {}, out + client.stderr.decode(errors="replace")
            try:
                results = json.loads(out)
            except ValueError:
                raise RuntimeError(f"the suite's client printed no JSON ({client.returncode}): "
                                   f"{out[-1000:]} {client.stderr.decode(errors='replace')[-2000:]}") from None
            return test_list, results, client.stderr.decode(errors="replace")
        finally:
            if proxy is not None and proxy.poll() is None:
                proxy.terminate()
                try:
                    proxy.wait(20)
                except subprocess.TimeoutExpired:
                    proxy.kill()
                    proxy.wait()
            origin.terminate()
            try:
                origin.wait(5)
            except subprocess.TimeoutExpired:
                origin.kill()
                origin.wait()
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"kept {work}", file=sys.stderr)


def _wait_listening(lab, ns: str, port: int, proc, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        out = lab.run(ns, "ss", "-Htln", f"sport = :{port}", check=False).stdout
        if out.strip():
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the suite's server is not listening on port {port}: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netns_lab.cache_conformance", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the raw results (the suite's JSON) here")
    ap.add_argument("--id", default="", help="run one test and print its requests and responses")
    ap.add_argument("--keep", action="store_true", help="keep the logs (origin, proxy, access log, cache)")
    ap.add_argument("--install-only", action="store_true", help="install the package and exit")
    a = ap.parse_args(argv)
    if a.install_only:
        print(f"{PACKAGE} {VERSION} in {ensure_installed()}")
        return 0
    test_list, results, text = run(a.id, a.keep)
    if a.id:
        print(text)
        return 0
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(report(test_list, results, score(test_list, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
