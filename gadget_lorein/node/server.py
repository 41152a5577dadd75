"""Passive mode (``config_xml/lorein_connect.xml``, ``lorein serve``): the node listens and
Gadgetron connects to it; each connection is served by :func:`gadget.reconstruct`."""
from __future__ import annotations

import logging
import socket
from typing import Callable

from .. import settings as settings_mod
from . import gadget
from .connection import GuardedSocket, close_message, describe_error, error_message

log = logging.getLogger(__name__)


def _listener(port: int, host: str = "") -> socket.socket:
    """Listening socket as gadgetron.external.listen makes it (AF_INET6 on '', dual stack), with
    an IPv4 fallback where IPv6 is unavailable."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            pass
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(8)
    return sock


def _serve_connection(conn_sock: socket.socket, overrides: dict | None) -> None:
    from gadgetron.external import Connection

    guarded = GuardedSocket(conn_sock)
    try:
        connection = Connection(guarded)    # reads the configuration and the header
    except BaseException as err:
        log.error("lorein: error: could not read the configuration and header: %s", describe_error(err))
        try:
            conn_sock.sendall(error_message(f"gadget_lorein: {describe_error(err)}") + close_message())
        except OSError:
            pass
        conn_sock.close()
        raise
    try:
        gadget.reconstruct(connection, overrides)
    finally:
        try:
            connection.socket.close()       # CLOSE, then close the socket
        except OSError as err:
            log.debug("closing the connection: %s", err)
            conn_sock.close()


def serve(port: int, settings: dict | None = None, once: bool = True, host: str = "",
          ready: Callable[[int], None] | None = None) -> None:
    """Listen on ``port`` (all interfaces, IPv6 and IPv4, as ``gadgetron.external.listen``) and
    serve Gadgetron's connections with :func:`gadget.reconstruct`; ``settings`` (a mapping,
    checked here before anything listens) override the chain's. ``once``: serve one connection and
    return (its error propagates); otherwise serve connections one after another until interrupted
    (an error ends that connection only). ``ready(port)`` is called once the socket listens."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s [lorein serve %(process)d] %(message)s",
                            level=logging.INFO)
    if settings:
        settings_mod.parse(settings)     # bad overrides fail before anything listens
    listener = _listener(port, host)
    port = listener.getsockname()[1]
    log.info("lorein serve: waiting for Gadgetron on port %d (%s)", port,
             "one connection" if once else "until interrupted")
    if ready is not None:
        ready(port)
    try:
        while True:
            conn_sock, address = listener.accept()
            log.info("lorein serve: connection from %s", address[0] if address else "?")
            try:
                _serve_connection(conn_sock, settings)
            except Exception:
                if once:
                    raise
                log.info("lorein serve: connection failed; waiting for the next one")
            if once:
                return
    finally:
        listener.close()
