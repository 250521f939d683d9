"""Spliced responses one after another on one keep-alive connection: no RTO.

Two bugs made every spliced response wait for an origin retransmission timeout
(~200 ms) without losing a byte, so byte-exact tests could not see them:
  * the first splice of a process imported pyroute2 (the fast path's route lookup)
    with the runner's lock held, and the segments queued meanwhile came too late;
  * a socket rebuilt at a resume offered a smaller receive window than the origin
    had been offered through the splice, and dropped what the origin sent past it.
With no loss injected, no retransmission timer may fire: the namespaces'
TcpExtTCPTimeouts stay where they were.  (Fast retransmissions do happen: packets still
in the queue when a pair turns fast are overtaken by the program's, and the reordering
makes the origin resend segments the client had; DSACKs show they were spurious.)
"""
from __future__ import annotations

import hashlib
import time

import pytest

from netns_lab.origins import NginxOrigin
from nfsplice import engine
from nfsplice.proxy import http
from netns_lab.topology import Lab
from tests.splicer import instance_stats
from tests.test_http_proxy import PROXY, HTTPProxyProc, curl, stop_all

pytestmark = pytest.mark.root

FAST, QUEUED = 8070, 8071


@pytest.fixture(scope="module")
def env():
    with Lab("hrs") as lab, NginxOrigin(lab) as ngx:
        sha = ngx.add_file("one.bin", 4 << 20, seed=5)
        up = ["--upstream", f"http://{ngx.addr}:{ngx.port}"]
        procs = {FAST: HTTPProxyProc(lab, FAST, *up, "--queue", "40", "--fastpath", "on", "--ports", "61000-61499",
                                     instance="hrs-fast"),
                 QUEUED: HTTPProxyProc(lab, QUEUED, *up, "--queue", "42", "--fastpath", "off",
                                       "--ports", "61500-61999", instance="hrs-queued")}
        try:
            yield lab, sha, procs
        finally:
            stop_all(lab, procs.values())


def nstat(lab, ns: str, name: str) -> int:
    out = lab.run(ns, "nstat", "-az", name).stdout.decode()
    for line in out.splitlines():
        if line.startswith(name + " "):
            return int(line.split()[1])
    raise AssertionError(f"nstat printed no {name}: {out!r}")


def timeouts(lab, ns: str) -> int:
    """Retransmission timeouts in NS so far (RTOs: a segment or an ACK was lost)."""
    return nstat(lab, ns, "TcpExtTCPTimeouts")


@pytest.mark.parametrize("port", [FAST, QUEUED])
def test_spliced_responses_in_a_row_wait_for_no_timeout(env, port):
    lab, sha, procs = env
    before = {ns: timeouts(lab, ns) for ns in (lab.origin, lab.client)}
    n = 8
    args = []
    for _ in range(n):
        args += ["-o", "-", f"http://{PROXY}:{port}/one.bin"]
    r = curl(lab, "-w", "%{num_connects}", *args)
    assert r.returncode == 0, r.stderr
    body = r.stdout
    for i in range(n):
        part = body[i * ((4 << 20) + 1):(i + 1) * ((4 << 20) + 1)]
        assert hashlib.sha256(part[:-1]).hexdigest() == sha and part[-1:] == (b"1" if i == 0 else b"0"), i
    lines = [l for l in procs[port].access_lines() if " GET /one.bin " in l][-n:]
    assert sum(" spliced " in l for l in lines) >= n - 1, lines      # (the first may be delivered whole)
    after = {ns: timeouts(lab, ns) for ns in (lab.origin, lab.client)}
    assert after == before, f"retransmission timeouts without loss: {before} -> {after}"
    if port == FAST:
        # With the fast path the rules queue only marked packets, and the proxy marks
        # its sockets at the freeze: what the drain sends (and the sockets' ACKs) goes
        # straight out, never waiting in the queue behind other pairs' packets.
        st = instance_stats("hrs-fast", time.time())
        assert st.get("pairs.spliced", 0) >= n - 1, st
        assert st.get("proxy_socket.handoff_out", 0) == 0, st


def test_next_body_waits_at_the_origin_not_in_the_rebuilt_socket(env):
    """After a spliced response, the next one on the same connections is spliced too,
    and the proxy copies little of it itself: the rebuilt upstream socket offers the
    origin no more than NEXT_MESSAGE_WINDOW past the body's end, and reads heads with a
    HEAD_RCVBUF buffer, so a body waits at the origin until the splice.  (With the
    kernel's autotuned buffer and the frozen socket's window counted from the message
    end, bodies arrived whole, or largely, before the hand-off and were copied.)"""
    lab, sha, procs = env
    n = 6
    before = instance_stats("hrs-fast", time.time())
    args = []
    for _ in range(n):
        args += ["-o", "/dev/null", f"http://{PROXY}:{FAST}/one.bin"]
    r = curl(lab, *args)
    assert r.returncode == 0, r.stderr
    after = instance_stats("hrs-fast", time.time())
    spliced = after.get("http.spliced", 0) - before.get("http.spliced", 0)
    copied = after.get("http.handoff_copied_bytes", 0) - before.get("http.handoff_copied_bytes", 0)
    assert spliced == n, (before, after)
    assert after.get("http.splice_skipped_arrived", 0) == before.get("http.splice_skipped_arrived", 0)
    assert copied / n <= 3 * http.HEAD_RCVBUF + engine.NEXT_MESSAGE_WINDOW, copied / n


def test_spliced_bodies_are_not_retransmitted(env):
    """No loss is injected, so the origin should resend little.  It resent about 250 of
    the ~2,900 segments of every spliced 4 MiB body (a quarter of the bytes, every one a
    duplicate the client reported by DSACK): the request's end was watched for after
    the splice, so the program punted the origin's first packets (all acknowledge it)
    to the queue and then overtook those still there once the engine had seen one; the
    client SACKed the overtaking segment and the origin's RACK took each overtaken one
    for lost.

    What it still resends (6-55 segments a body in 16 runs, one of them in CI) are
    segments reordered on the veth between the origin and the proxy, by a microsecond,
    before the program sees them (tcpdump at the proxy's ingress shows the swap; at the
    origin's egress the order is right); curl straight to the origin through the routed
    proxy namespace resends 0-6 a body.  So the bound sits between the two: well under
    the old bug, above the noise, and the program must have punted nothing for the
    watch (the old bug's cause, counted)."""
    lab, sha, procs = env
    n = 8
    before = nstat(lab, lab.origin, "TcpRetransSegs")
    st0 = instance_stats("hrs-fast", time.time())
    args = []
    for _ in range(n):
        args += ["-o", "/dev/null", f"http://{PROXY}:{FAST}/one.bin"]
    r = curl(lab, *args)
    assert r.returncode == 0, r.stderr
    resent = nstat(lab, lab.origin, "TcpRetransSegs") - before
    st = instance_stats("hrs-fast", time.time())
    assert st.get("pairs.spliced", 0) - st0.get("pairs.spliced", 0) >= n - 1, st
    assert st.get("fastpath.punt.ack_watch", 0) == st0.get("fastpath.punt.ack_watch", 0), (st0, st)
    assert resent <= n * 100, f"{resent} segments resent for {n} spliced 4 MiB bodies"
