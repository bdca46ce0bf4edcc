#!/usr/bin/env python3
"""GET one URL over HTTP/3 with aioquic (PyPI) and print {"status", "headers", "body"} as JSON.

Usage: aioquic_get.py <host> <port> <path> <ca.pem>
The TLS and QUIC stacks are aioquic's; this file only drives its HTTP/3 client API.
"""
import asyncio
import json
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = asyncio.get_running_loop().create_future()
        self.status = None
        self.headers = {}
        self.body = b""

    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                for k, v in e.headers:
                    if k == b":status":
                        self.status = int(v)
                    else:
                        self.headers[k.decode()] = v.decode()
            elif isinstance(e, DataReceived):
                self.body += e.data
            if getattr(e, "stream_ended", False) and not self.done.done():
                self.done.set_result(True)

    async def get(self, authority, path):
        stream = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                (b"user-agent", b"aioquic"),
            ],
            end_stream=True,
        )
        self.transmit()
        await asyncio.wait_for(self.done, 20)


async def main(host, port, path, ca):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(ca)
    async with connect(host, port, configuration=config, create_protocol=Client) as client:
        await client.get(f"localhost:{port}", path)
        print(json.dumps({
            "status": client.status,
            "headers": client.headers,
            "body": client.body.decode(errors="replace"),
        }))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
