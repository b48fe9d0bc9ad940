"""A TCP forwarder that the chaos harness switches off and on: an outage of one service.

``python -m tests.chaos.proxy <listen port> <target host> <target port>``

Service processes reach PostgreSQL or RabbitMQ through it; the machine's own servers are
never touched. ``SIGUSR1`` switches it off: the listening socket closes, so new connections are
refused, and every open connection is reset on both sides. ``SIGUSR2`` switches it on again.
Each change prints one line (``proxy off 1``, ``proxy on 1``, …) that the harness waits for.
It runs as its own process (asyncio, one thread) so that forwarding a worker's database or
broker traffic takes no time from the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

CHUNK = 64 * 1024


class Forwarder:
    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()
        self.switched = {"on": 0, "off": 0}
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, reuse_address=True, backlog=256
        )

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.open.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for side in (writer, up_writer):
                self.open.discard(side)
                side.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        # One direction ended (a close or a reset): end the other one too.
        writer.transport.abort()

    async def off(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.open):
            writer.transport.abort()
        self.open.clear()
        self.switched["off"] += 1
        print(f"proxy off {self.switched['off']}", flush=True)

    async def on(self) -> None:
        if self.server is None:
            await self.start()
        self.switched["on"] += 1
        print(f"proxy on {self.switched['on']}", flush=True)


async def main(port: int, host: str, target_port: int) -> None:
    forwarder = Forwarder(port, (host, target_port))
    await forwarder.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(forwarder.off()))
    loop.add_signal_handler(signal.SIGUSR2, lambda: loop.create_task(forwarder.on()))
    loop.add_signal_handler(signal.SIGTERM, forwarder.stopped.set)
    print(f"proxy listening on 127.0.0.1:{port} for {host}:{target_port}", flush=True)
    await forwarder.stopped.wait()


if __name__ == "__main__":
    listen, target_host, target = sys.argv[1:4]
    asyncio.run(main(int(listen), target_host, int(target)))
