"""Replay an ISMRMRD raw file through a Gadgetron server: a Python ``gadgetron_ismrmrd_client``.

What it sends and writes follows the stock client (gadgetron/gadgetron,
apps/clients/gadgetron_ismrmrd_client/gadgetron_ismrmrd_client.cpp):

- the chain: by name with ``-c NAME`` (message 1, a 1024-byte name the server looks up in its
  ``share/gadgetron/config``) or as text with ``-C FILE`` (message 2, length-prefixed XML);
- the raw file's XML header verbatim (message 3), every acquisition (1008) with the waveforms (1026)
  merged in by time stamp exactly as the stock client does (a waveform goes first when its
  ``time_stamp`` is below the acquisition's ``acquisition_time_stamp``), then CLOSE (4); the file is
  read by :func:`gadget_lorein.io.rawfile.read_stream`, the package's one reader of raw files;
- images coming back are appended to ``OUT_GROUP/image_<image_series_index>`` (``data``, ``header``,
  ``attributes``) of the output file, OUT_GROUP defaulting to the local date and time
  ``YYYY-MM-DD HH:MM:SS``; the file is created only when an image arrives; text messages (5) are
  printed; the server's CLOSE ends the run.

Like the stock client it reads the server's answer while it sends. Unlike it, it never waits
forever (timeouts on connect and on every read and write) and it treats a text message of the form
``[...] ERROR: ...`` as a failure: Gadgetron 4 reports every error of a connection, including the
ERROR messages an external gadget sends it, as such a text before its CLOSE, and the stock client
prints the text and still exits 0.

Needs ismrmrd-python >= 1.15 (``ProtocolSerializer`` / ``ProtocolDeserializer``). Those name the
message ids in ``ismrmrd.serialization.ISMRMRDMessageID``: CONFIG_FILE=1, CONFIG_TEXT=2, HEADER=3,
CLOSE=4, TEXT=5, ACQUISITION=1008, IMAGE=1022, WAVEFORM=1026, NDARRAY=1030; a config is sent by
wrapping it in ``ConfigFile`` (a name) or ``ConfigText`` (XML), a plain ``str`` goes as TEXT. The
deserializer reads TEXT (as ``str``) but not ERROR (8) or RESPONSE (7), which it rejects as an
unknown id; Gadgetron sends a client neither during a reconstruction.
"""

from __future__ import annotations

import argparse
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd
from tqdm import tqdm

from ..io import rawfile
from ..io.header import MRDError

DEFAULT_CONFIG = "lorein.xml"   # the stock client's default is default.xml
# message id of the ISMRMRD XML header (gadgetron-python's GADGET_MESSAGE_HEADER, not imported:
# replay is a client and needs only h5py, ismrmrd, numpy and tqdm)
HEADER_ID = 3
_SERVER_ERROR = re.compile(r"\] ERROR: ")


class ReplayError(RuntimeError):
    """A replay failed; the message says which step (input, connect, send, receive, server)."""


@dataclass
class ReplayResult:
    """What a replay sent and received."""

    output_path: str
    out_group: str
    acquisitions_sent: int = 0
    waveforms_sent: int = 0
    images: dict = field(default_factory=dict)     # dataset name (image_N) -> count
    texts: list = field(default_factory=list)      # text messages from the server
    ignored: int = 0                               # other messages (acquisitions, arrays) not written

    @property
    def n_images(self) -> int:
        return sum(self.images.values())

    @property
    def errors(self) -> list:
        """The server's error reports among the text messages."""
        return [t for t in self.texts if _SERVER_ERROR.search(t)]


def date_time_group() -> str:
    """The stock client's default output group: local time as ``YYYY-MM-DD HH:MM:SS``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def _ismrmrd_version() -> str:
    """The installed ismrmrd-python's version (1.14 and 1.15 have no ``__version__``)."""
    from importlib import metadata
    try:
        return metadata.version("ismrmrd")
    except metadata.PackageNotFoundError:
        return getattr(ismrmrd, "__version__", "unknown")


def _protocol():
    """ProtocolSerializer/Deserializer classes, or a clear error on ismrmrd < 1.15."""
    try:
        from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer
    except ImportError as e:
        raise ReplayError(f"replay needs ismrmrd-python >= 1.15 (ProtocolSerializer); installed: "
                          f"{_ismrmrd_version()}; upgrade it with: python -m pip install 'ismrmrd>=1.15'") from e
    return ProtocolSerializer, ProtocolDeserializer, ConfigFile, ConfigText


def _interleave(acqs, wavs):
    """Acquisitions and waveforms in the stock client's order (merge by time stamp, ties to acquisitions)."""
    a, w = next(acqs, None), next(wavs, None)
    while a is not None or w is not None:
        if w is not None and (a is None or w.time_stamp < a.acquisition_time_stamp):
            yield w
            w = next(wavs, None)
        else:
            yield a
            a = next(acqs, None)


class _Receiver(threading.Thread):
    """Reads the server's messages until its CLOSE, writing images as they come."""

    def __init__(self, rfile, deserializer_cls, result: ReplayResult, echo):
        super().__init__(name="replay-receiver", daemon=True)
        self.rfile, self.deserializer_cls, self.result, self.echo = rfile, deserializer_cls, result, echo
        self.error: BaseException | None = None
        self.last_message = time.monotonic()

    def run(self):
        out = None
        try:
            for item in self.deserializer_cls(self.rfile).deserialize():
                self.last_message = time.monotonic()
                if isinstance(item, ismrmrd.Image):
                    if out is None:
                        out = ismrmrd.Dataset(self.result.output_path, self.result.out_group, create_if_needed=True)
                    name = f"image_{item.image_series_index}"
                    out.append_image(name, item)
                    self.result.images[name] = self.result.images.get(name, 0) + 1
                elif isinstance(item, str):
                    self.result.texts.append(item)
                    if not _SERVER_ERROR.search(item):  # errors end up in the ReplayError
                        self.echo(item)
                else:
                    self.result.ignored += 1
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            if out is not None:
                out.close()


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"no message from the server for {timeout:g} s"
    if isinstance(error, EOFError):
        return "the server closed the connection without a CLOSE message"
    if isinstance(error, ValueError) and "MessageID" in str(error):
        return f"unexpected message from the server ({error})"
    return f"{type(error).__name__}: {error}"


def replay(input_path, output_path, host: str = "localhost", port: int = 9002, config_name: str | None = None,
           config_file=None, in_group: str = "dataset", out_group: str | None = None, timeout: float = 3600.0,
           progress: bool = True, connect_timeout: float = 10.0, echo=None) -> ReplayResult:
    """Send ``input_path`` through the chain on ``host:port``; write the images to ``output_path``.

    ``config_name`` asks the server for a chain in its config folder (``-c``), ``config_file`` sends a
    local chain file's text (``-C``); with neither, ``lorein.xml`` is asked for by name. ``timeout``
    bounds every wait for the server (seconds without a message while it reconstructs, or a blocked
    send); ``connect_timeout`` the TCP connect. ``echo`` receives text messages (default: print).
    Raises :class:`ReplayError` naming what failed, including errors the server reports.
    """
    ProtocolSerializer, ProtocolDeserializer, ConfigFile, ConfigText = _protocol()
    if config_name and config_file:
        raise ReplayError("give a chain by name (-c) or as a file (-C), not both")
    echo = echo or (lambda text: print(text, end="" if text.endswith("\n") else "\n", flush=True))
    result = ReplayResult(str(output_path), out_group or date_time_group())

    if config_file is not None:
        try:
            config = ConfigText(Path(config_file).read_text())
        except OSError as e:
            raise ReplayError(f"cannot read chain file {config_file}: {e}") from e
    else:
        config = ConfigFile(config_name or DEFAULT_CONFIG)

    try:
        stream = rawfile.read_stream(str(input_path), in_group)
    except OSError as e:
        raise ReplayError(f"cannot open input {input_path}: {e}") from e
    except MRDError:
        stream = None
    if stream is None or stream.n_acquisitions == 0:
        raise ReplayError(f"input {input_path} has no ISMRMRD header and acquisitions in group {in_group!r}")
    header, n_acq, n_wav = stream.header, stream.n_acquisitions, stream.n_waveforms
    items = _interleave(stream.acquisitions, stream.waveforms)
    try:
        sock = socket.create_connection((host, int(port)), timeout=connect_timeout)
    except OSError as e:
        raise ReplayError(f"cannot connect to Gadgetron at {host}:{port}: {e}") from e
    sock.settimeout(timeout)
    rfile, wfile = sock.makefile("rb"), sock.makefile("wb")
    receiver = _Receiver(rfile, ProtocolDeserializer, result, echo)
    receiver.start()
    send_error = None
    try:
        serializer = ProtocolSerializer(wfile)
        serializer.serialize(config)
        # the header goes verbatim, as the stock client sends it (serialize() would re-render it
        # through the xsd classes)
        wfile.write(struct.pack("<HI", HEADER_ID, len(header)) + header)
        with tqdm(total=n_acq + n_wav, unit="msg", desc="sending", disable=not progress,
                  file=sys.stderr, leave=False) as bar:
            for item in items:
                serializer.serialize(item)
                if isinstance(item, ismrmrd.Waveform):
                    result.waveforms_sent += 1
                else:
                    result.acquisitions_sent += 1
                bar.update()
        serializer.close()  # CLOSE, flush
    except OSError as e:  # includes timeouts; the receiver may know why (server errors)
        send_error = e

    # every read times out after `timeout` s of silence; this loop is only a backstop
    while receiver.is_alive() and time.monotonic() - receiver.last_message < timeout + 10.0:
        receiver.join(1.0)
    try:  # unblocks a receiver that is still reading, so that closing cannot hang
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    receiver.join(5.0)
    for closable in (wfile, rfile, sock):
        try:
            closable.close()
        except (OSError, ValueError):
            pass

    if receiver.is_alive():
        raise ReplayError(f"receiving from {host}:{port} stalled: no message for {timeout:g} s")
    if result.errors:
        raise ReplayError(f"the server reported errors ({result.n_images} images written):\n"
                          + "\n".join(t.strip() for t in result.errors))
    if receiver.error is not None:
        raise ReplayError(f"receiving from {host}:{port} failed after {result.n_images} images: "
                          + _describe(receiver.error, timeout))
    if send_error is not None:
        raise ReplayError(f"sending to {host}:{port} failed after {result.acquisitions_sent} acquisitions: "
                          + _describe(send_error, timeout))
    return result


def add_replay_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``lorein replay`` (the stock client's letters and meanings) to ``parser``."""
    parser.add_argument("input", help="ISMRMRD raw file (the stock client's -f)")
    parser.add_argument("-o", "--outfile", default="out.h5", help="output file (default: out.h5)")
    parser.add_argument("-a", "--address", default="localhost", help="Gadgetron host (default: localhost)")
    parser.add_argument("-p", "--port", type=int, default=9002, help="Gadgetron port (default: 9002)")
    chain = parser.add_mutually_exclusive_group()
    chain.add_argument("-c", "--config", help=f"chain name in the server's config folder (default: {DEFAULT_CONFIG})")
    chain.add_argument("-C", "--config-local", help="local chain file, sent as text")
    parser.add_argument("-g", "--in-group", default="/dataset", help="input group (default: /dataset)")
    parser.add_argument("-G", "--out-group", help="output group (default: local date and time)")
    parser.add_argument("-t", "--timeout", type=float, default=10000,
                        help="connect timeout in ms, as the stock client (default: 10000)")
    parser.add_argument("--read-timeout", type=float, default=3600,
                        help="seconds to wait for any message from the server before giving up (default: 3600)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def run_replay(args: argparse.Namespace) -> int:
    """Run a replay from parsed arguments; print a summary; return the exit status (0 = success)."""
    try:
        result = replay(args.input, args.outfile, host=args.address, port=args.port, config_name=args.config,
                        config_file=args.config_local, in_group=args.in_group, out_group=args.out_group,
                        timeout=args.read_timeout, connect_timeout=args.timeout / 1000.0,
                        progress=not args.quiet)
    except ReplayError as e:
        print(f"lorein replay: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lorein replay: interrupted", file=sys.stderr)
        return 130
    if result.n_images == 0:
        print("lorein replay: warning: the server sent no images; a gadget that raised without sending an "
              "ERROR message ends like this (see the server's log)", file=sys.stderr)
    series = ", ".join(f"{k} ({v})" for k, v in sorted(result.images.items())) or "none"
    print(f"sent {result.acquisitions_sent} acquisitions and {result.waveforms_sent} waveforms; "
          f"{result.n_images} images written to {result.output_path} group '{result.out_group}': {series}")
    return 0


def main(argv=None) -> int:
    """``python -m gadget_lorein.node.replay``: the same as ``lorein replay``."""
    parser = argparse.ArgumentParser(prog="lorein replay", description="Send an ISMRMRD raw file through a "
                                     "Gadgetron chain and write the images back (like gadgetron_ismrmrd_client).")
    return run_replay(add_replay_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
