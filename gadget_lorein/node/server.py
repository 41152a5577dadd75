"""Passive mode (``config_xml/lorein_connect.xml``, ``lorein serve``): the node listens and
Gadgetron connects to it; each connection is served by :func:`gadget.reconstruct`."""
from __future__ import annotations

import logging
import socket
from typing import Callable

from .. import limits
from .. import settings as settings_mod
from . import gadget, guard
from .connection import GuardedSocket, close_message, describe_error, error_message

log = logging.getLogger(__name__)


def _listener(port: int, host: str = limits.DEFAULT_HOST) -> socket.socket:
    """Listening socket: on loopback by default (``limits.DEFAULT_HOST``); on '' as
    gadgetron.external.listen makes it (AF_INET6, dual stack, all interfaces), with an IPv4
    fallback where IPv6 is unavailable; on any other address in its own family."""
    if host:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(8)
        return sock
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

    guarded = GuardedSocket(conn_sock, limits.CONFIG_TIMEOUT_S)   # the configuration and header
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


def serve(port: int, settings: dict | None = None, once: bool = True, host: str = limits.DEFAULT_HOST,
          ready: Callable[[int], None] | None = None) -> None:
    """Listen on ``port`` (loopback unless ``host`` says otherwise: '' = all interfaces, IPv6 and
    IPv4, as ``gadgetron.external.listen``, with a warning in the log) and serve Gadgetron's
    connections with :func:`gadget.reconstruct`; ``settings`` (checked here before anything
    listens) override the chain's. ``once``: serve one connection in this process and return (its
    error propagates); otherwise serve each connection in its own process (``node/guard.py``), at
    most ``limits.MAX_CONNECTIONS`` at once (more are refused with an ERROR), until interrupted.
    Reads time out (``limits.CONFIG_TIMEOUT_S`` for the configuration and header,
    ``limits.MESSAGE_TIMEOUT_S`` between messages). ``ready(port)`` is called once it listens."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s [lorein serve %(process)d] %(message)s",
                            level=logging.INFO)
    if settings:
        settings_mod.parse(settings)     # bad overrides fail before anything listens
    listener = _listener(port, host)
    port = listener.getsockname()[1]
    if not limits.is_loopback(host):
        log.warning("lorein serve: listening on %s, not only on loopback: anyone who can reach this "
                    "port can send data to reconstruct", host or "all interfaces")
    log.info("lorein serve: waiting for Gadgetron on port %d (%s)", port,
             "one connection" if once else "until interrupted")
    if ready is not None:
        ready(port)
    children: list = []
    try:
        while True:
            conn_sock, address = listener.accept()
            log.info("lorein serve: connection from %s", address[0] if address else "?")
            if once:
                _serve_connection(conn_sock, settings)
                return
            children = [c for c in children if c.poll() is None]
            if len(children) >= limits.MAX_CONNECTIONS:
                log.error("lorein serve: refused a connection: %d in progress (limit %d)",
                          len(children), limits.MAX_CONNECTIONS)
                guard.refuse(conn_sock, f"busy: {len(children)} connections in progress (limit "
                             f"{limits.MAX_CONNECTIONS}); try again later")
                continue
            try:
                children.append(guard.spawn(conn_sock, settings))
            finally:
                conn_sock.close()
    finally:
        listener.close()
        for child in children:
            if child.poll() is None:
                child.terminate()
