"""Pcap replay with golden outputs (no root): tests/replay/<case>/.

Each case directory holds input.pcap (a whole lab capture in the proxy namespace,
Linux cooked v2), pairs.json (the live engine's splice records), expected.txt (one line
per packet the proxy sent to the client or the origin, from the capture's leaving
copies) and README.md (what ran; regenerate with `python -m netns_lab.capture --case
NAME` as root, and review the diff like code).

Replaying input.pcap through the engine must give exactly expected.txt: every field,
TCP options included, and a hash of each packet with only TTL and checksums zeroed.
"""
from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Raw, raw

from nfsplice import packet as P
from nfsplice import replay as R

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted(d for d in (ROOT / "tests" / "replay").iterdir() if (d / "input.pcap").exists())
OWN_VERDICTS = ("MANGLE", "RELEASE-MANGLE", "INJECT")   # bytes the engine wrote itself


def expected(case: Path) -> list[str]:
    return [line for line in (case / "expected.txt").read_text().splitlines() if line and not line.startswith("#")]


def load(case: Path):
    return R.read_pcap(case / "input.pcap"), R.read_pairs(str(case / "pairs.json"))


def assert_lines(got: list[str], want: list[str]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"line {i + 1}:\n expected {w}\n replayed {g}"
    assert len(got) == len(want), f"{len(got)} packets replayed, {len(want)} expected"


def scapy_checksums_ok(pkt: bytes) -> None:
    """scapy recomputes both checksums from the bytes; they must equal the stored ones."""
    ip = IP(pkt)
    tcp = ip[TCP]
    payload = pkt[(ip.ihl * 4) + tcp.dataofs * 4:]
    tcp.remove_payload()
    if payload:
        tcp.add_payload(Raw(payload))
    del ip.chksum
    del tcp.chksum
    rebuilt = raw(ip)
    assert rebuilt[10:12] == pkt[10:12], "IP checksum"
    assert rebuilt[36:38] == pkt[36:38], "TCP checksum"
    assert rebuilt == pkt


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request):
    frames, records = load(request.param)
    return request.param, frames, records, R.replay(frames, records)


def test_cases_exist():
    assert {"plain", "server-first", "reset", "two-pairs", "loss"} <= {c.name for c in CASES}


def test_splice_points(case):
    """Each pair is spliced after the proxy's ACK completing the upstream handshake: the
    live engine lets that ACK out even when the socket was frozen before it left."""
    path, _frames, _records, res = case
    assert not res.notes


def test_replay_matches_expected(case):
    path, frames, records, res = case
    assert not res.guessed
    assert_lines(res.wire_lines(), expected(path))
    assert res.counters["pairs.spliced"] == len(records)
    assert not any(k.startswith(("malformed.", "dropped.")) for k in res.counters), res.counters
    assert res.bad_checksums == 0
    # Every packet the engine rewrote has exactly one forwarded copy in the capture.
    assert res.forwarded_copies == res.counters["packets.c2s"] + res.counters["packets.s2c"]


def test_expected_is_what_the_capture_says(case):
    """expected.txt is derived from the capture alone (the leaving copies), so it cannot
    drift from input.pcap."""
    path, frames, records, _res = case
    assert R.expected_lines(frames, R.proxy_ips_of(records)) == expected(path)


def test_own_output_checksums_verify(case):
    _path, _frames, _records, res = case
    own = [o for o in res.outputs if o.verdict in OWN_VERDICTS]
    assert own
    for o in own:
        scapy_checksums_ok(o.buf)


def test_forwarded_copies_carry_our_tcp_checksum(case):
    """Stronger than the golden lines: the kernel forwarded our rewritten bytes as they
    were, so the captured copies' TCP checksums equal ours (only TTL and the IP header
    checksum differ, from forwarding)."""
    _path, frames, records, res = case
    ips = R.proxy_ips_of(records)
    sent: dict[bytes, list[bytes]] = {}
    for f in R.sent_by_proxy(frames, ips):
        sent.setdefault(f.data[12:24], []).append(f.data)
    index = {k: {R.normalised(b): b for b in v} for k, v in sent.items()}
    for o in res.wire():
        if o.verdict not in OWN_VERDICTS:
            continue
        cap = index[o.buf[12:24]][R.normalised(o.buf)]
        assert cap[36:38] == o.buf[36:38]
        assert cap[8] == o.buf[8] - 1        # one router hop


def test_cli(case, tmp_path):
    path, _frames, records, res = case
    out = tmp_path / "out.pcap"
    p = subprocess.run([sys.executable, "-m", "nfsplice", "replay", str(path / "input.pcap"),
                        "--pairs", str(path / "pairs.json"), "--out", str(out), "--summary"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    summary = [line for line in p.stdout.splitlines() if re.match(r"\s*\d+ [A-Z]", line)]
    assert len(summary) == len(res.outputs)
    assert f"pairs: {len(records)} from" in p.stdout
    written = R.read_pcap(out)
    assert [f.data for f in written] == [o.buf for o in res.outputs if o.to != "none"]
    # The raw-IP output carries no direction: the proxy's addresses say what left it.
    assert R.expected_lines(written, R.proxy_ips_of(records)) == expected(path)


def _strip_guesses(line: str) -> str:
    """Without records TSvals are guessed (TCP_TIMESTAMP is not on the wire)."""
    return re.sub(r" pkt=\S+", "", re.sub(r"ts\d+/\d+", "ts", line))


def test_learned_pairs(case):
    path, frames, records, _res = case
    res = R.replay(frames)
    assert res.guessed
    pairs = {(r["client"], r["proxy_a"], r["proxy_b"], r["server"]) for r in res.records}
    assert pairs == {(r["client"], r["proxy_a"], r["proxy_b"], r["server"]) for r in records}
    by_b = {r["proxy_b"]: r for r in records}
    for r in res.records:
        live = by_b[r["proxy_b"]]
        for side in ("a", "b"):
            # ts_now, mss and the repair window are not on the wire: not learned.
            unseen = ("ts_now", "mss", "window")
            want = {k: v for k, v in live[side].items() if k not in unseen}
            assert {k: v for k, v in r[side].items() if k not in unseen} == want
    assert [_strip_guesses(x) for x in res.wire_lines()] == [_strip_guesses(x) for x in expected(path)]


def test_cli_without_pairs_says_guessed(tmp_path):
    path = ROOT / "tests" / "replay" / "plain"
    p = subprocess.run([sys.executable, "-m", "nfsplice", "replay", str(path / "input.pcap"),
                        "--out", str(tmp_path / "out.pcap")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "guessed" in p.stdout


def test_missing_handshake_ack_splices_after_synack():
    """The engine may drop the proxy's ACK completing B's handshake (the splice won the
    race to the queue); replay then splices right after the origin's SYN-ACK."""
    path = ROOT / "tests" / "replay" / "plain"
    frames, records = load(path)
    ips = R.proxy_ips_of(records)
    tcp = {f.index: R._tcp(f) for f in frames if f.skip is None}
    hs = R._upstream_handshakes(frames, tcp, ips, lambda k: k[4:8] + k[10:12] != bytes([198, 18, 1, 1]) + (9000).to_bytes(2, "big"))
    ack = hs[0].ack_at
    assert ack is not None
    gone = frames[ack]
    res = R.replay([f for f in frames if f.index != ack], records)
    assert any("spliced after the origin's SYN-ACK" in n for n in res.notes)
    want = list(expected(path))
    want.remove(R.packet_line(gone.data))
    assert_lines(res.wire_lines(), want)


# -- malformed input ---------------------------------------------------------------------
def _with_ip_options(buf: bytes) -> bytes:
    """BUF with 4 bytes of IP options (NOPs... EOL), lengths and IP checksum fixed."""
    b = bytearray(buf[:20] + b"\x01\x01\x01\x00" + buf[20:])
    b[0] = 0x46
    struct.pack_into("!H", b, 2, len(b))
    b[10:12] = b"\0\0"
    struct.pack_into("!H", b, 10, P.checksum.ip_header(b[:24]))
    return bytes(b)


def _fragment(buf: bytes) -> bytes:
    b = bytearray(buf)
    b[6] |= 0x20          # more fragments
    b[10:12] = b"\0\0"
    struct.pack_into("!H", b, 10, P.checksum.ip_header(b[:20]))
    return bytes(b)


def _renumber(frames):
    for i, f in enumerate(frames):
        f.index = i
    return frames


def test_malformed_packets_are_counted_standalone(tmp_path):
    c, s = bytes([198, 18, 1, 2]), bytes([198, 18, 1, 1])
    good = bytes(P.build(c, s, 40000, 9000, 1000, 0, P.SYN, options=b"\x02\x04\x05\xb4"))
    data = bytes(P.build(c, s, 40000, 9000, 1001, 5000, P.ACK | P.PSH, payload=b"x" * 100))
    longer = bytearray(data)
    struct.pack_into("!H", longer, 2, len(data) + 8)            # says 8 bytes more than it has
    frames = _renumber([
        R.Frame(0, 1.0, good, len(good)),
        R.Frame(0, 1.1, data[:12], 12),                      # shorter than an IP header
        R.Frame(0, 1.2, _with_ip_options(data), len(data) + 4),
        R.Frame(0, 1.3, _fragment(data), len(data)),
        R.Frame(0, 1.4, bytes(longer), len(data)),            # IP total length wrong
        R.Frame(0, 1.5, bytes([0x60]) + data[1:], len(data)),  # version 6 in an IPv4 frame
        R.Frame(0, 1.6, data[:50], len(data)),               # snaplen cut it: the SYN's pair drops it
    ])
    res = R.replay(frames, [], listen="198.18.1.1:9000")
    for reason in ("truncated", "ip-options", "fragment", "bad-length", "not-ipv4"):
        assert res.counters.get(f"malformed.{reason}") == 1, (reason, res.counters)
    assert res.counters.get("dropped.truncated") == 1
    assert [o.verdict for o in res.outputs] == ["ACCEPT"] * 6 + ["DROP"]
    # The same through the CLI, from a raw-IP pcap (which keeps the snaplen cut).
    pcap = tmp_path / "bad.pcap"
    with open(pcap, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, R.LINKTYPE_RAW))
        for fr in frames:
            f.write(struct.pack("<IIII", int(fr.time), 0, len(fr.data), fr.wire_len) + fr.data)
    assert [(f.data, f.truncated) for f in R.read_pcap(pcap)] == [(f.data, f.truncated) for f in frames]
    p = subprocess.run([sys.executable, "-m", "nfsplice", "replay", str(pcap), "--out", str(tmp_path / "o.pcap"),
                        "--summary"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in ("truncated", "ip-options", "fragment", "bad-length"):
        assert f"malformed.{name}=1" in p.stdout
    assert "dropped.truncated=1" in p.stdout
    assert "skipped (not-ipv4 1)" in p.stdout    # a raw-IP pcap's IPv6 packet: not for the engine


def _client_data_after_splice(frames, records):
    """Index of the first data packet from the client that arrives after the splice."""
    res = R.replay(frames, records)
    mangled = {o.index for o in res.outputs if o.verdict == "MANGLE"}
    client = records[0]["client"].rpartition(":")[0]
    for f in frames:
        t = R._tcp(f) if f.skip is None else None
        if t and f.index in mangled and R._ip(t.key[:4]) == client and t.plen:
            return f.index
    raise AssertionError("no spliced client data packet")


def test_malformed_packets_inside_a_spliced_pair():
    """Broken copies of a spliced packet are counted and get a verdict; the pair's real
    packets are still replayed exactly."""
    path = ROOT / "tests" / "replay" / "plain"
    frames, records = load(path)
    i = _client_data_after_splice(frames, records)
    data = frames[i].data
    bad = [R.Frame(0, frames[i].time, _with_ip_options(data), len(data) + 4, frames[i].outgoing),
           R.Frame(0, frames[i].time, _fragment(data), len(data), frames[i].outgoing),
           R.Frame(0, frames[i].time, data[:60], len(data), frames[i].outgoing)]
    frames = _renumber(frames[:i + 1] + bad + frames[i + 1:])
    res = R.replay(frames, records)
    assert res.counters.get("malformed.ip-options") == 1
    assert res.counters.get("malformed.fragment") == 1
    assert res.counters.get("dropped.truncated") == 1
    assert_lines(res.wire_lines(), expected(path))


def test_truncated_packet_of_spliced_pair_is_dropped():
    """A packet cut short (snaplen here, NFQA_CAP_LEN live) cannot be rewritten whole."""
    path = ROOT / "tests" / "replay" / "plain"
    frames, records = load(path)
    i = _client_data_after_splice(frames, records)
    f = frames[i]
    frames = _renumber(frames[:i + 1] + [R.Frame(0, f.time, f.data[:60], len(f.data), f.outgoing)]
                       + frames[i + 1:])
    res = R.replay(frames, records)
    assert res.counters.get("dropped.truncated") == 1
    assert [o.verdict for o in res.outputs if o.index == i + 1] == ["DROP"]


def test_unreadable_input_is_a_usage_error(tmp_path):
    bad = tmp_path / "x.pcap"
    bad.write_bytes(b"not a pcap at all, clearly")
    p = subprocess.run([sys.executable, "-m", "nfsplice", "replay", str(bad), "--out", str(tmp_path / "o.pcap")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "not a pcap file" in p.stderr
