"""The config file of `nfsplice http --config`: good files, and every kind of mistake
reported with its file, line and key.  No root, no network."""
from __future__ import annotations

import textwrap

import pytest

from nfsplice import cli, config
from nfsplice.config import ConfigError, parse_size
from nfsplice.proxy.http import Settings


def load(tmp_path, text: str, defaults: Settings | None = None, name: str = "nfsplice.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return config.load(str(path), defaults or Settings()), str(path)


def error(tmp_path, text: str) -> tuple[str, str]:
    """The message of the ConfigError TEXT raises, and the file's path."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    return str(e.value), str(tmp_path / "nfsplice.toml")


# -- sizes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value,n", [(0, 0), (65536, 65536), ("65536", 65536), ("64KiB", 65536),
                                     ("1MiB", 1 << 20), ("2 GiB", 2 << 30), ("7B", 7), (" 12 ", 12)])
def test_sizes(value, n):
    assert parse_size(value) == n


@pytest.mark.parametrize("value", ["abc", "64KB", "64kib", "1.5MiB", "-1", "", "KiB", 1.5, True, None, [1]])
def test_bad_sizes(value):
    with pytest.raises(ValueError, match="expected a size like 64KiB"):
        parse_size(value)


def test_negative_size():
    with pytest.raises(ValueError, match="0 or more"):
        parse_size(-1)


# -- good files -----------------------------------------------------------------------------
FULL = """\
    # Two listeners in one process.
    [[listener]]
    listen = "198.18.1.1:8080"
    upstreams = ["http://198.18.2.2:8000", "http://198.18.2.3:8000/"]
    splice = true
    splice_threshold = "1MiB"
    max_header_bytes = "16KiB"
    max_header_fields = 50
    max_connections = 100
    connect_ports = [443, 8443]
    ports = "61000-61999"
    source = "198.18.2.1"
    pool_size = 4
    down_time = 2.5

    [listener.timeouts]
    header = 3
    keepalive = 4
    connect = 0.5
    response = 6
    pool_idle = 7

    [[listener]]
    listen = "198.18.1.1:3128"
    ports = "62000-62999"
    splice = false
    """


def test_full_file(tmp_path):
    (a, b), _ = load(tmp_path, FULL)
    assert a.listen == ("198.18.1.1", 8080)
    assert a.upstreams == (("198.18.2.2", 8000), ("198.18.2.3", 8000))
    assert a.splice and a.threshold == 1 << 20 and a.limits.max_head_bytes == 16 << 10
    assert a.limits.max_fields == 50 and b.limits.max_fields == Settings().limits.max_fields
    assert a.max_connections == 100 and a.connect_ports == {443, 8443}
    assert a.ports == (61000, 61999) and a.source == "198.18.2.1"
    assert a.pool_size == 4 and a.down_time == 2.5
    t = a.timeouts
    assert (t.header, t.idle, t.connect, t.response, t.pool_idle) == (3, 4, 0.5, 6, 7)
    assert b.listen == ("198.18.1.1", 3128) and b.upstreams == () and not b.splice
    assert b.ports == (62000, 62999)
    # Untouched keys keep the defaults, also inside the tables given in part.
    assert b.threshold == 2 << 20 and b.timeouts.connect == 5.0 and b.pool_size == 32
    assert t.splice_idle == Settings().timeouts.splice_idle


def test_cache_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (a, b), _ = load(tmp_path, """\
        [[listener]]
        listen = "198.18.1.1:8080"
        ports = "61000-61099"
        cache_dir = "cache-a"
        cache_size = "512MiB"
        cache_heuristic = true
        purge_from = ["127.0.0.1", "198.18.1.0/24"]
        [[listener]]
        listen = "198.18.1.1:8081"
        ports = "61100-61199"
        """)
    assert a.cache_dir == str(tmp_path / "cache-a") and a.cache_size == 512 << 20    # absolute
    assert a.cache_heuristic and not b.cache_heuristic
    assert [str(n) for n in a.purge_from] == ["127.0.0.1/32", "198.18.1.0/24"]
    assert b.cache_dir is None and b.cache_size == 1 << 30 and [str(n) for n in b.purge_from] == ["127.0.0.1/32"]


def test_cache_options_on_the_command_line(tmp_path, capsys):
    from nfsplice.service import _http_defaults
    args = cli.build_parser().parse_args(["http", "--cache-dir", str(tmp_path), "--cache-size", "2GiB",
                                          "--purge-from", "10.0.0.0/8,127.0.0.1"])
    s = _http_defaults(args)
    assert s.cache_dir == str(tmp_path) and s.cache_size == 2 << 30 and len(s.purge_from) == 2
    bad = cli.build_parser().parse_args(["http", "--purge-from", "10.0.0.0/33"])
    with pytest.raises(cli.UsageError, match=r"--purge-from: '10.0.0.0/33' is not an IPv4 address"):
        _http_defaults(bad)
    assert cli.main(["http", "--listen", "198.18.1.1:8080", "--cache-size", "0", "--no-splice"]) == 2
    assert "--cache-size must be 1 byte or more" in capsys.readouterr().err


def test_command_line_values_are_the_defaults(tmp_path):
    defaults = cli.build_parser().parse_args(["http", "--splice-threshold", "2MiB", "--connect-timeout", "9",
                                              "--ports", "63000-63999", "--pool-size", "3"])
    from nfsplice.service import _http_defaults
    (s,), _ = load(tmp_path, """\
        [[listener]]
        listen = "198.18.1.1:8080"
        pool_size = 5
        """, _http_defaults(defaults))
    assert s.threshold == 2 << 20 and s.timeouts.connect == 9 and s.ports == (63000, 63999)
    assert s.pool_size == 5           # the file wins


def test_dotted_and_inline_timeouts(tmp_path):
    (a, b), _ = load(tmp_path, """\
        [[listener]]
        listen = "198.18.1.1:8080"
        ports = "61000-61099"
        timeouts.connect = 2
        [[listener]]
        listen = "198.18.1.1:8081"
        ports = "61100-61199"
        timeouts = { response = 3, header = 4 }
        """)
    assert a.timeouts.connect == 2 and (b.timeouts.response, b.timeouts.header) == (3, 4)


# -- mistakes: the file, the line, the key ---------------------------------------------------
def test_the_example_of_the_issue(tmp_path):
    msg, path = error(tmp_path, """\
        [[listener]]
        listen = "198.18.1.1:8080"
        splice_threshold = "abc"
        """)
    assert msg == f"{path}:3: listener[1].splice_threshold: expected a size like 64KiB, got 'abc'"


MISTAKES = [
    # (file text, line, text the message must contain)
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nsplice_treshold = 5\n', 3,
     "listener[1].splice_treshold: unknown key (did you mean splice_threshold?)"),
    ('listen = "198.18.1.1:8080"\n', 1, "listen: unknown key (did you mean listener?)"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\n[listener.timeouts]\nconect = 1\n', 4,
     "listener[1].timeouts.conect: unknown key (did you mean connect?)"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\n[listener.timeout]\nconnect = 1\n', 3,
     "listener[1].timeout: unknown key (did you mean timeouts?)"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nmax_connections = "10"\n', 3,
     "listener[1].max_connections: expected an integer, got '10'"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nmax_connections = 0\n', 3,
     "listener[1].max_connections: expected 1 or more, got 0"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\npool_size = true\n', 3,
     "listener[1].pool_size: expected an integer, got True"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nsplice = 1\n', 3,
     "listener[1].splice: expected true or false, got 1"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nconnect_ports = "443"\n', 3,
     "listener[1].connect_ports: expected a list of ports like [443, 8443], got '443'"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\ndown_time = -1\n', 3,
     "listener[1].down_time: expected 0 or more seconds, got -1"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\n\n[listener.timeouts]\nconnect = 0\n', 5,
     "listener[1].timeouts.connect: expected more than 0 seconds, got 0"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\ntimeouts.header = "5s"\n', 3,
     "listener[1].timeouts.header: expected a number of seconds, got '5s'"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\ntimeouts = 5\n', 3,
     "listener[1].timeouts: expected a table like [listener.timeouts], got 5"),
    ('[[listener]]\nlisten = "nonsense"\n', 2, "listener[1].listen: expected ADDRESS:PORT, got 'nonsense'"),
    ('[[listener]]\nlisten = "0.0.0.0:8080"\n', 2, "listener[1].listen: give a concrete address"),
    ('[[listener]]\nlisten = "198.18.1.1:99999"\n', 2, "listener[1].listen: port 99999 out of range"),
    ('[[listener]]\nlisten = "example.org:80"\n', 2, "listener[1].listen: 'example.org' is not an IPv4 address"),
    ('[[listener]]\nlisten = 8080\n', 2, "listener[1].listen: expected a string, got 8080"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nupstreams = ["198.18.2.2:8000"]\n', 3,
     "listener[1].upstreams: expected http://ADDRESS:PORT, got '198.18.2.2:8000'"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nupstreams = "http://198.18.2.2:8000"\n', 3,
     "listener[1].upstreams: expected a list like"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nupstreams = []\n', 3,
     "(leave the key out for a forward proxy)"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nupstreams = [\n  "http://198.18.2.2:8000",\n'
     '  "http://198.18.2.2:8000",\n]\n', 3, "listener[1].upstreams: http://198.18.2.2:8000 is listed twice"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nsource = "198.18.2"\n', 3,
     "listener[1].source: expected an IPv4 address, got '198.18.2'"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nports = "10-5"\n', 3,
     "listener[1].ports: 10-5 is not a range within 1024-65535"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nports = "many"\n', 3,
     "listener[1].ports: expected LOW-HIGH, got 'many'"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nmax_header_bytes = 0\n', 3,
     "listener[1].max_header_bytes: expected 1 or more bytes, got 0"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nmax_header_fields = 0\n', 3,
     "listener[1].max_header_fields: expected 1 or more, got 0"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nmax_header_fields = "20"\n', 3,
     "listener[1].max_header_fields: expected an integer, got '20'"),
    ('# nothing\n\n[[listener]]\nsplice = false\n', 3, 'listener[1]: no listen = "ADDRESS:PORT"'),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nports = "61000-61999"\n\n[[listener]]\nports = "62000-62999"\n'
     'listen = "198.18.1.1:8080"\n', 7, "listener[2].listen: listener[1] listens on 198.18.1.1:8080 already"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nports = "61000-61999"\n[[listener]]\nlisten = "198.18.1.1:8081"\n'
     'ports = "61999-62999"\n', 6, "listener[2].ports: 61999-62999 overlaps listener[1]'s 61000-61999"),
    # Without a ports key both take --ports: the error points at the second listener.
    ('[[listener]]\nlisten = "198.18.1.1:8080"\n\n[[listener]]\nlisten = "198.18.1.1:8081"\n', 4,
     "listener[2].ports: 61000-62999 overlaps listener[1]'s 61000-62999 (each listener needs its own"),
    ('[listener]\nlisten = "198.18.1.1:8080"\n', 1, "listener: expected [[listener]] tables"),
    ('listener = []\n', 1, "listener: expected [[listener]] tables"),
    # The second listener's key, not the first's of the same name.
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nports = "61000-61099"\npool_size = 1\n\n[[listener]]\n'
     'listen = "198.18.1.1:8081"\nports = "61100-61199"\npool_size = -1\n', 9,
     "listener[2].pool_size: expected 0 or more, got -1"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\ncache_size = 0\n', 3,
     "listener[1].cache_size: expected a size of 1 byte or more, got 0"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\ncache_dir = 5\n', 3,
     "listener[1].cache_dir: expected a string, got 5"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\npurge_from = ["127.0.0.1/32", "localhost"]\n', 3,
     "listener[1].purge_from: 'localhost' is not an IPv4 address or network like 127.0.0.1/32"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\npurge_from = []\n', 3,
     "listener[1].purge_from: expected addresses or networks like"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nports = "61000-61099"\ncache_dir = "/tmp/c"\n\n'
     '[[listener]]\nlisten = "198.18.1.1:8081"\nports = "61100-61199"\ncache_dir = "/tmp/c"\n'
     'cache_size = "1MiB"\n', 10, "listener[2].cache_size: 1048576 bytes, but listener[1] uses cache_dir /tmp/c "
     "with 1073741824 (a shared cache has one size)"),
    # TOML syntax: tomllib's own line and column.
    ('[[listener]]\nlisten = "198.18.1.1:8080\n', "2:26", "Illegal character"),
    ('[[listener]]\nlisten = "198.18.1.1:8080"\nlisten = "198.18.1.1:8081"\n', "3:27", "Cannot overwrite a value"),
]


@pytest.mark.parametrize("text,line,want", MISTAKES, ids=[m[2][:60] for m in MISTAKES])
def test_mistakes_name_file_line_and_key(tmp_path, text, line, want):
    msg, path = error(tmp_path, text)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert want in msg, msg


def test_no_listener_at_all(tmp_path):
    msg, path = error(tmp_path, "# empty\n")
    assert msg == f"{path}: no [[listener]] table: nothing to listen on"


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: No such file or directory"):
        config.load(str(tmp_path / "nope.toml"), Settings())
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[[listener]]\nlisten = "\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml: not UTF-8 text \(byte 23\)"):
        config.load(str(bad), Settings())


# -- the command line -------------------------------------------------------------------------
def test_sizes_on_the_command_line():
    p = cli.build_parser()
    args = p.parse_args(["http", "--listen", "198.18.1.1:8080", "--splice-threshold", "1MiB",
                         "--max-header-bytes", "16KiB"])
    assert (args.splice_threshold, args.max_header_bytes) == (1 << 20, 16 << 10)
    assert p.parse_args(["http", "--listen", "198.18.1.1:8080"]).splice_threshold == 2 << 20


def test_max_header_fields_on_the_command_line_and_in_the_file(tmp_path, capsys):
    """--max-header-fields is every listener's field-line limit; a listener's
    max_header_fields overrides it, and max_header_bytes leaves it alone."""
    from nfsplice.service import _http_defaults
    args = cli.build_parser().parse_args(["http", "--max-header-fields", "20", "--max-header-bytes", "16KiB"])
    defaults = _http_defaults(args)
    assert (defaults.limits.max_fields, defaults.limits.max_head_bytes) == (20, 16 << 10)
    assert cli.build_parser().parse_args(["http"]).max_header_fields == Settings().limits.max_fields
    (a, b), _ = load(tmp_path, """\
        [[listener]]
        listen = "198.18.1.1:8080"
        ports = "61000-61099"
        max_header_fields = 10
        max_header_bytes = "8KiB"

        [[listener]]
        listen = "198.18.1.1:8081"
        ports = "61100-61199"
        """, defaults)
    assert (a.limits.max_fields, a.limits.max_head_bytes) == (10, 8 << 10)
    assert (b.limits.max_fields, b.limits.max_head_bytes) == (20, 16 << 10)
    assert cli.main(["http", "--listen", "198.18.1.1:8080", "--max-header-fields", "0", "--no-splice"]) == 2
    assert "--max-header-fields must be 1 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["http", "--max-header-fields", "many"])
    assert "--max-header-fields: invalid int value: 'many'" in capsys.readouterr().err


def test_bad_size_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["http", "--listen", "198.18.1.1:8080", "--splice-threshold", "lots"])
    assert e.value.code == 2
    assert "--splice-threshold: expected a size like 64KiB, got 'lots'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,want", [
    (["--listen", "198.18.1.1:8080"], "--listen and --upstream do not go with --config"),
    (["--upstream", "http://198.18.2.2:8000"], "--listen and --upstream do not go with --config"),
    ([], None),
])
def test_config_on_the_command_line(tmp_path, capsys, argv, want):
    path = tmp_path / "bad.toml"
    path.write_text('[[listener]]\nlisten = "198.18.1.1:8080"\nsplice_threshold = "abc"\n')
    assert cli.main(["http", "--config", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nfsplice: ") and "Traceback" not in err
    # The file is read only when the command line is right; then its mistake is named.
    assert (want or f"{path}:3: listener[1].splice_threshold: expected a size") in err, err


def test_http_needs_listen_or_config(capsys):
    assert cli.main(["http"]) == 2
    assert "http needs --listen ADDRESS:PORT (or --config FILE)" in capsys.readouterr().err
