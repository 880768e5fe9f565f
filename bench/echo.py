#!/usr/bin/env python3
"""Echo server for the benchmark: asyncio, loopback, large backlog.

A connection whose first bytes are ``SINK\\n`` is a sink instead: everything
it sends is read and discarded (the bulk side of the fairness measurement,
``fairness.py``, which needs both its connections on one tunnel target).

Usage: echo.py PORT
"""
import asyncio
import sys

SINK = b"SINK\n"


async def handle(reader, writer):
    try:
        data = await reader.read(65536)
        if data.startswith(SINK):
            while await reader.read(1 << 18):
                pass
            return
        while data:
            writer.write(data)
            await writer.drain()
            data = await reader.read(65536)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
