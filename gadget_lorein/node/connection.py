"""What the node says to Gadgetron besides images: ERROR messages, and a socket guard.

Gadgetron's message ids and framing are gadgetron-python's (``gadgetron.external.constants``): an
ERROR is <uint16 id GADGET_MESSAGE_ERROR, uint64 length, UTF-8 text>; CLOSE is the id alone.
"""
from __future__ import annotations

import logging
import socket

from gadgetron.external import constants

from .. import limits

log = logging.getLogger(__name__)

ERROR_MESSAGE_ID = constants.GADGET_MESSAGE_ERROR
CLOSE_MESSAGE_ID = constants.GADGET_MESSAGE_CLOSE
DRAIN_TIMEOUT_S = 30.0                 # after an error: longest silence while draining the stream


class GuardedSocket:
    """A socket whose ``recv`` raises ConnectionError when the peer has gone (an empty read)
    instead of returning b'' (on which gadgetron-python's reader loops forever), and whose reads
    time out after ``timeout`` seconds of silence (gadgetron-python's ``settimeout(None)`` keeps it)."""

    def __init__(self, sock, timeout: float | None = None):
        self._sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)

    def settimeout(self, value):
        self._sock.settimeout(self.timeout if value is None else value)

    def recv(self, nbytes, *flags):
        try:
            data = self._sock.recv(nbytes, *flags)
        except socket.timeout:
            raise TimeoutError(f"no message from Gadgetron for {self._sock.gettimeout():g} s") from None
        if not data and nbytes > 0:
            raise ConnectionError("Gadgetron closed the connection without a CLOSE message")
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def guard(connection) -> None:
    """Guard a gadgetron-python Connection's socket (see GuardedSocket)."""
    from .guard import strict_readers
    wrapper = connection.socket
    if not isinstance(wrapper.socket, GuardedSocket):
        wrapper.socket = GuardedSocket(wrapper.socket)
    wrapper.socket.timeout = limits.MESSAGE_TIMEOUT_S      # between messages, from now on
    wrapper.socket.settimeout(None)
    strict_readers(connection)


def describe_error(err: BaseException) -> str:
    """One line: '<Type>: <message>'."""
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text}"


def error_message(text: str) -> bytes:
    """An ERROR message as sent on the wire."""
    msg = text.encode("utf-8", "replace")
    return (constants.GadgetMessageIdentifier.pack(ERROR_MESSAGE_ID) + constants.uint64.pack(len(msg))
            + msg)


def close_message() -> bytes:
    return constants.GadgetMessageIdentifier.pack(CLOSE_MESSAGE_ID)


def send_error(connection, text: str) -> bool:
    """Send Gadgetron an ERROR message on a Connection. False if it failed."""
    try:
        connection.socket.write(error_message(text))
        return True
    except OSError as err:
        log.warning("could not send the ERROR message to Gadgetron: %s", err)
        return False


def drain(connection, timeout: float = DRAIN_TIMEOUT_S) -> int:
    """Read and drop messages until Gadgetron's CLOSE (or silence / a closed peer)."""
    n = 0
    try:
        connection.socket.socket.settimeout(timeout)
        for _ in connection:
            n += 1
    except (OSError, ConnectionError, ValueError, EOFError) as err:
        log.debug("draining stopped after %d messages: %s", n, err)
    except Exception as err:   # a malformed message: nothing more to do
        log.debug("draining stopped after %d messages: %s", n, describe_error(err))
    return n
