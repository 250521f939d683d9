"""A plain asyncio L4 proxy: every byte is read into Python and written back out.

    python -m netns_lab.peers.asyncio_proxy --listen 198.18.1.1:9000 --upstream 198.18.2.2:9001

asyncio streams on the default event loop (selector, one thread): per connection two
coroutines, each `await reader.read(--chunk)`, `writer.write()`, `await writer.drain()`
until EOF, which becomes write_eof() toward the other side.  The streams' buffer limit
is raised to the chunk size (the default 64 KiB limit pauses reading early).  asyncio
sets TCP_NODELAY on its stream sockets.  SIGTERM stops the loop.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from netns_lab.peers.bench_tools import parse_addr


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunk: int) -> None:
    """Copy reader to writer until EOF, then half-close the writer."""
    try:
        while data := await reader.read(chunk):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter,
                 upstream: tuple[str, int], chunk: int) -> None:
    try:
        ureader, uwriter = await asyncio.wait_for(
            asyncio.open_connection(*upstream, limit=chunk), timeout=5)
    except (OSError, asyncio.TimeoutError) as e:
        print(f"asyncio_proxy: upstream {upstream[0]}:{upstream[1]}: {e!r}", file=sys.stderr)
        cwriter.transport.abort()
        return
    try:
        await asyncio.gather(pipe(creader, uwriter, chunk), pipe(ureader, cwriter, chunk))
    finally:
        for w in (uwriter, cwriter):
            w.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int], chunk: int) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, upstream, chunk),
                                        *listen, limit=chunk, reuse_address=True, backlog=512)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netns_lab.peers.asyncio_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=parse_addr, required=True)
    ap.add_argument("--upstream", type=parse_addr, required=True)
    ap.add_argument("--chunk", type=int, default=256 << 10, help="bytes per read")
    a = ap.parse_args(argv)
    try:
        asyncio.run(serve(a.listen, a.upstream, a.chunk))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
