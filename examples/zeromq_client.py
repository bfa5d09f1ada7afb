#!/usr/bin/env python3
"""A minimal client of idemq's ZeroMQ `router` endpoint (pyzmq).

Lazy Pirate, as in the ZeroMQ guide: a REQ socket sends a request and waits
for the reply; with no reply in time it closes the socket, opens a new one
and sends the same request again. idemq answers each request only once its
outcome is settled, so resending is always safe: a message is processed once
however many times it is sent.

Request: [message-id, header (JSON object, or empty), body]
Reply:   [message-id, "ok"]               processed, or a duplicate of a processed one
         [message-id, "retry", why]       not settled: send it again later
         [message-id, "dead", reason]     dead-lettered

Usage: one JSON object per line on stdin, {"id": ..., "body": ..., "header": {...}};
one line per message on stdout: "<id> <status> [detail]".

    zeromq_client.py --endpoint tcp://127.0.0.1:5555 < messages.jsonl

CURVE: --server-key=KEY (the endpoint's public key, joined with "=": a Z85 key
may begin with "-"), and the client's own pair from the environment,
ZMQ_CLIENT_PUBLIC_KEY and ZMQ_CLIENT_SECRET_KEY (Z85).
"""

import argparse
import json
import os
import sys
import time

import zmq


class LazyPirate:
    def __init__(self, endpoint, timeout_ms=2500, retries=20, retry_after_s=0.2, curve=None):
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.retry_after_s = retry_after_s
        self.curve = curve  # (server public, client public, client secret), Z85 bytes
        self.ctx = zmq.Context.instance()
        self.socket = None
        self._connect()

    def _connect(self):
        if self.socket is not None:
            # A REQ socket that got no reply cannot send again: start over.
            self.socket.close(linger=0)
        self.socket = self.ctx.socket(zmq.REQ)
        if self.curve:
            server, public, secret = self.curve
            self.socket.curve_serverkey = server
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        self.socket.connect(self.endpoint)

    def send(self, message_id, body, header=None):
        """Sends until the endpoint settles the message; returns (status, detail)."""
        frames = [
            message_id.encode(),
            json.dumps(header).encode() if header else b"",
            body if isinstance(body, bytes) else json.dumps(body).encode(),
        ]
        for _ in range(self.retries):
            self.socket.send_multipart(frames)
            if not self.socket.poll(self.timeout_ms, zmq.POLLIN):
                self._connect()  # no reply: resend on a fresh socket
                continue
            reply = self.socket.recv_multipart()
            status = reply[1].decode()
            detail = reply[2].decode() if len(reply) > 2 else ""
            if status == "retry":
                time.sleep(self.retry_after_s)
                continue
            return status, detail
        raise RuntimeError(f"{message_id}: no final answer after {self.retries} tries")

    def close(self):
        self.socket.close(linger=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument(
        "--server-key", help="the endpoint's CURVE public key (Z85); pass it as --server-key=KEY"
    )
    parser.add_argument("--timeout-ms", type=int, default=2500)
    args = parser.parse_args()
    curve = None
    if args.server_key:
        curve = (
            args.server_key.encode(),
            os.environ["ZMQ_CLIENT_PUBLIC_KEY"].encode(),
            os.environ["ZMQ_CLIENT_SECRET_KEY"].encode(),
        )
    client = LazyPirate(args.endpoint, timeout_ms=args.timeout_ms, curve=curve)
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        status, detail = client.send(message["id"], message.get("body", {}), message.get("header"))
        print(message["id"], status, detail, flush=True)
    client.close()


if __name__ == "__main__":
    main()
