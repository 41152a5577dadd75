"""Worker discovery for distributed chains: ``lorein workers HOST:PORT ...`` prints, as the JSON list
Gadgetron reads from ``GADGETRON_REMOTE_WORKER_COMMAND``, those of the given Gadgetron servers that
answer now.

Why: Gadgetron 4.7 sends each part of the stream to the workers its discovery command lists, and
when one of them is down it retries the connection every 2 s for about 16 s and then drops the
scan's connection ("terminate called" in its log): the client gets no images, even though the other
workers reconstructed their parts. Listing only the workers that answer avoids it; with none answering the list is empty and Gadgetron reconstructs on the main
server itself (it logs "Remote worker list empty; adding local worker").

The probe is the Gadgetron protocol's own CLOSE: connect, send CLOSE (message id 4), and expect the
server's CLOSE back; the server logs a [CONFIG] connection that finishes, and no error. A worker
that dies after the probe, during a scan, is not covered. Reads only the standard library.
"""
from __future__ import annotations

import json
import logging
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

CLOSE = struct.pack("<H", 4)
PROBE_TIMEOUT_S = 2.0


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"worker address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a Gadgetron server at host:port answers a CLOSE with a CLOSE."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(CLOSE)
            reply = b""
            while len(reply) < 2:
                chunk = sock.recv(2 - len(reply))
                if not chunk:
                    break
                reply += chunk
            return reply == CLOSE
    except OSError:
        return False


def alive(addresses, timeout: float = PROBE_TIMEOUT_S) -> list[str]:
    """The addresses (HOST:PORT, in the given order) whose server answers; probed in parallel."""
    parsed = [parse_address(a) for a in addresses]
    if not parsed:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(parsed))) as pool:
        ok = list(pool.map(lambda hp: probe(*hp, timeout=timeout), parsed))
    for a, good in zip(addresses, ok):
        if not good:
            log.warning("worker %s does not answer: left out", a)
    return [a.strip() for a, good in zip(addresses, ok) if good]


def worker_list_json(addresses, timeout: float = PROBE_TIMEOUT_S) -> str:
    """The JSON list for Gadgetron (no spaces: ["h1:9002","h2:9002"])."""
    return json.dumps(alive(addresses, timeout), separators=(",", ":"))
