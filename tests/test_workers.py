"""``lorein workers`` (node/workers.py): the discovery command of distributed chains lists only the
Gadgetron servers that answer the protocol's CLOSE; here against a fake server (the real ones:
test_gadgetron_distributed.py)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gadget_lorein.node import workers
from gadgetron_server import free_port

LORE = Path(sys.executable).with_name("lorein")


def fake_gadgetron(reply: bytes):
    """A listener that answers every connection's first 2 bytes with ``reply``; returns its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(2)
                conn.sendall(reply)
    threading.Thread(target=loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_probe_and_alive_keep_the_order_and_drop_the_silent():
    good, p1 = fake_gadgetron(workers.CLOSE)
    wrong, p2 = fake_gadgetron(b"HTTP/1.1 400\r\n")      # something else listens there
    dead = free_port()
    try:
        addresses = [f"127.0.0.1:{p2}", f"localhost:{dead}", f"127.0.0.1:{p1}"]
        assert workers.alive(addresses, timeout=2) == [f"127.0.0.1:{p1}"]
        assert workers.worker_list_json([f"127.0.0.1:{p1}", f"127.0.0.1:{p1}"]) == \
            f'["127.0.0.1:{p1}","127.0.0.1:{p1}"]'
    finally:
        good.close()
        wrong.close()


@pytest.mark.parametrize("bad", ["localhost", "localhost:x", ":9002", "h:70000"])
def test_addresses_must_be_host_port(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        workers.parse_address(bad)


def test_cli_prints_the_json_list_gadgetron_reads():
    srv, port = fake_gadgetron(workers.CLOSE)
    try:
        proc = subprocess.run([str(LORE), "workers", f"localhost:{port}", f"localhost:{free_port()}",
                               "--timeout", "1"], capture_output=True, text=True, timeout=60)
    finally:
        srv.close()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [f"localhost:{port}"] and " " not in proc.stdout.strip()
    assert "does not answer" in proc.stderr
    bad = subprocess.run([str(LORE), "workers", "nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
