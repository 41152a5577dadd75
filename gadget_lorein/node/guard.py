"""Guards around a Gadgetron connection (used by node/gadget.py):

- :class:`PeerWatchdog`: a thread that notices, while the reconstruction runs and nothing reads the
  socket, that Gadgetron has gone (an empty ``recv(MSG_PEEK)`` or a reset); the fit's progress
  callback then raises ``ConnectionError`` within about ``limits.PEER_POLL_S`` seconds per step;
- :func:`strict_readers`: message ids gadgetron-python has no reader for are an error that names
  the id (gadgetron-python ends the stream as if CLOSE had come, which read as a truncated stream);
- :func:`refuse`: an ERROR and CLOSE for a connection that is not served (too many at once);
- :func:`spawn` and ``python -m gadget_lorein.node.guard FD``: one process per connection for
  ``lorein serve --forever``, so that one silent peer cannot hold up the others.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading

from .. import limits
from ..io.header import MRDError
from .connection import close_message, error_message

log = logging.getLogger(__name__)

SETTINGS_ENV = "LOREIN_SERVE_SETTINGS"


def raw_socket(sock):
    """The socket object under gadgetron-python's wrapper and our _GuardedSocket."""
    sock = getattr(sock, "socket", sock)          # Connection.SocketWrapper
    return getattr(sock, "_sock", sock)           # _GuardedSocket


class PeerWatchdog(threading.Thread):
    """Polls the socket every ``interval`` seconds; ``gone`` is set when the peer has closed (or
    shut down its sending side) or reset the connection. Never consumes a byte. A peer that half-
    closes during the fit is taken as gone (Gadgetron does not; it closes when it goes)."""

    def __init__(self, sock, interval: float = limits.PEER_POLL_S):
        super().__init__(daemon=True, name="lorein-peer-watchdog")
        self.sock = raw_socket(sock)
        self.interval = interval
        self.gone = threading.Event()
        self._halt = threading.Event()

    def run(self):
        # poll for the peer's FIN (POLLRDHUP, Linux) or a reset (POLLHUP / POLLERR): a plain
        # recv(MSG_PEEK) sees the unread bytes first (Gadgetron's CLOSE, sent before the fit ends)
        # and would never see the end of the stream behind them
        rdhup = getattr(select, "POLLRDHUP", 0)
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN | rdhup | select.POLLHUP | select.POLLERR)
        except (OSError, ValueError):
            return
        while not self._halt.is_set():
            try:
                events = poller.poll(self.interval * 1000)
                if self._halt.is_set():
                    return
                for _, ev in events:
                    if ev & (rdhup | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                        self.gone.set()
                        return
                    if ev & select.POLLIN and not rdhup:      # no POLLRDHUP: peek for EOF
                        if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                            self.gone.set()
                            return
                if events:
                    self._halt.wait(self.interval)      # data waiting (read later): do not spin
            except BlockingIOError:
                continue
            except (OSError, ValueError):              # reset, or the socket was closed under us
                if not self._halt.is_set():
                    self.gone.set()
                return

    def stop(self):
        self._halt.set()

    def check(self) -> None:
        """Raise ConnectionError when the peer has gone."""
        if self.gone.is_set():
            raise ConnectionError("Gadgetron closed the connection during the reconstruction")


class _StrictReaders(dict):
    """gadgetron-python's reader table, with unknown message ids an error instead of CLOSE."""

    def get(self, key, default=None):
        if key in self:
            return self[key]

        def unknown(*_):
            raise MRDError(f"unknown message id {key} from Gadgetron (known: "
                           f"{', '.join(map(str, sorted(self)))}); the stream cannot be read further")
        return unknown


def strict_readers(connection) -> None:
    if not isinstance(connection.readers, _StrictReaders):
        connection.readers = _StrictReaders(connection.readers)


def refuse(sock: socket.socket, text: str) -> None:
    """Send an ERROR message and CLOSE, and close the socket."""
    try:
        sock.settimeout(5)
        sock.sendall(error_message(f"gadget_lorein: {text}") + close_message())
    except OSError:
        pass
    finally:
        sock.close()


def spawn(conn_sock: socket.socket, settings: dict | None) -> subprocess.Popen:
    """Serve ``conn_sock`` in a child process (``python -m gadget_lorein.node.guard FD``)."""
    env = dict(os.environ)
    env[SETTINGS_ENV] = json.dumps(settings or {})
    fd = conn_sock.fileno()
    return subprocess.Popen([sys.executable, "-m", "gadget_lorein.node.guard", str(fd)], pass_fds=(fd,),
                            env=env, stdin=subprocess.DEVNULL)


def _child(fd: int) -> int:
    from . import server
    logging.basicConfig(format="%(asctime)s %(levelname)s [lorein serve %(process)d] %(message)s",
                        level=logging.INFO)
    settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}") or None
    sock = socket.socket(fileno=fd)
    try:
        server._serve_connection(sock, settings)
    except BaseException as err:           # logged by the gadget already
        log.debug("connection ended with %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
