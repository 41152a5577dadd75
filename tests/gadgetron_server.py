"""Run a real Gadgetron server from tests (a helper module, not a test file).

Usage in a test::

    from gadgetron_server import GadgetronServer, require_gadgetron

    @pytest.mark.gadgetron
    def test_something(tmp_path):
        gt = require_gadgetron()                      # skip (or fail when CI=true) if none
        with GadgetronServer(gt, tmp_path) as server:  # config_xml/*.xml installed, free port
            proc = server.run_client(["-f", raw, "-o", out, "-c", "lorein.xml"])   # stock client
            replay(raw, out, port=server.port, config_name="lorein.xml")          # ours
            assert " ERROR " not in server.log_text()

The server always runs from a private home made by :func:`make_home` (config_xml/*.xml copied into
``share/gadgetron/config`` as docker/Dockerfile installs them), so ``-c NAME`` finds our chains and
parallel servers do not share a working directory. External Python gadgets are started by the server
as ``python -m gadgetron PORT MODULE TARGET`` with the first ``python`` on PATH: the current
interpreter's bin folder is put first on PATH so they run in this venv.

Some copies of the installation have their library symlinks flattened into small text files that
hold the link target (``libismrmrd.so.1.14`` containing ``libismrmrd.so.1.14.1``); the dynamic loader
then fails with "file too short". :func:`library_dir` detects that and builds a folder of real
symlinks instead, leaving the installation untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENABLE_HINT = ("no Gadgetron found: set GADGETRON_HOME, put gadgetron and gadgetron_ismrmrd_client on PATH, "
               "or provide ../shared/gadgetron (run its setup.sh once)")


@dataclass
class Gadgetron:
    """A Gadgetron installation: where its programs, libraries and stock chains are."""

    root: Path         # installation prefix (has lib/ and share/gadgetron/config)
    server: Path       # the server executable itself (not a wrapper script)
    client: Path       # gadgetron_ismrmrd_client executable
    lib: Path          # library folder to put on LD_LIBRARY_PATH

    @property
    def config_dir(self) -> Path:
        """The installation's stock chains."""
        return self.root / "share" / "gadgetron" / "config"


def _installation(root: Path) -> Gadgetron | None:
    """Describe the installation under ``root``; prefers libexec/ binaries over bin/ wrappers."""
    root = Path(root)

    def program(name: str) -> Path | None:
        for sub in ("libexec", "bin"):
            path = root / sub / name
            if path.is_file() and os.access(path, os.X_OK):
                return path
        return None

    server, client = program("gadgetron"), program("gadgetron_ismrmrd_client")
    if server is None or client is None or not (root / "lib").is_dir():
        return None
    return Gadgetron(root=root.resolve(), server=server.resolve(), client=client.resolve(), lib=root / "lib")


def find_gadgetron() -> Gadgetron | None:
    """Find a Gadgetron: $GADGETRON_HOME, else ``gadgetron`` on PATH, else ../shared/gadgetron."""
    candidates = []
    if os.environ.get("GADGETRON_HOME"):
        candidates.append(Path(os.environ["GADGETRON_HOME"]))
    on_path = shutil.which("gadgetron")
    if on_path and shutil.which("gadgetron_ismrmrd_client"):
        candidates.append(Path(on_path).resolve().parent.parent)
    candidates.append(REPO.parent / "shared" / "gadgetron")
    for root in candidates:
        found = _installation(root)
        if found is not None:
            return found
    return None


def require_gadgetron() -> Gadgetron:
    """Return the installation, or skip the test (fail instead when env CI=true)."""
    found = find_gadgetron()
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(ENABLE_HINT + " (CI=true: Gadgetron tests must run)")
        pytest.skip(ENABLE_HINT)
    return found


def _link_target(path: Path) -> str | None:
    """If ``path`` is a flattened symlink (a tiny text file naming a sibling), return the sibling's name."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 255:
        return None
    name = path.read_bytes().strip().decode("ascii", "replace")
    return name if name and "/" not in name and (path.parent / name).exists() else None


def library_dir(lib: Path, workdir: Path) -> Path:
    """Return ``lib`` itself, or (if its symlinks were flattened) a repaired copy made of symlinks."""
    lib = Path(lib).resolve()
    entries = sorted(lib.iterdir())
    if not any(_link_target(p) for p in entries):
        return lib
    fixed = Path(workdir) / "lib"
    fixed.mkdir(parents=True, exist_ok=True)
    for p in entries:
        target = p
        for _ in range(8):  # follow chains such as .so -> .so.4.7 -> .so.4.7.2
            name = _link_target(target)
            if name is None:
                break
            target = lib / name
        (fixed / p.name).symlink_to(target)
    return fixed


def project_chains() -> list:
    """The project's chains, config_xml/*.xml: what docker/Dockerfile copies into the server's config folder."""
    return sorted((REPO / "config_xml").glob("*.xml"))


def make_home(tmpdir, chains=(), gadgetron: Gadgetron | None = None, project: bool = True) -> Path:
    """Build a Gadgetron home in ``tmpdir``: ``lib`` linked to the installation's libraries, and in
    ``share/gadgetron/config`` the stock chains, the project's chains (config_xml/*.xml, as
    docker/Dockerfile installs them, unless ``project`` is false) and ``chains`` (XML paths, relative
    to the repo or absolute).

    Start the server with ``SERVER --home HOME`` and HOME/lib on LD_LIBRARY_PATH (GadgetronServer
    does both)."""
    gadgetron = gadgetron or find_gadgetron()
    if gadgetron is None:
        raise FileNotFoundError(ENABLE_HINT)
    home = Path(tmpdir) / "home"
    config = home / "share" / "gadgetron" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (home / "lib").symlink_to(library_dir(gadgetron.lib, Path(tmpdir) / "fixed"))
    for xml in sorted(gadgetron.config_dir.glob("*.xml")):
        shutil.copyfile(xml, config / xml.name)
    for chain in [*(project_chains() if project else []), *chains]:
        shutil.copyfile(REPO / chain, config / Path(chain).name)
    return home


def listening(port: int) -> bool:
    """True when something listens on TCP ``port``. Reads /proc/net/tcp{,6} on Linux, since a test
    connection would make Gadgetron log an ERROR (a connection without a config); elsewhere connects."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(t.exists() for t in tables):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False
    for table in tables:
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    return True
    return False


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GadgetronServer:
    """A Gadgetron server on a free loopback port, as a context manager.

    The server's config folder holds the stock chains, config_xml/*.xml and ``chains`` (extra XML
    files, relative to the repo or absolute); ``env`` is merged into the server's environment (e.g.
    PYTHONPATH for probe gadgets, which the server's python children inherit). The log (stdout and
    stderr, the gadgets' included) goes to ``workdir/gadgetron.log``."""

    def __init__(self, gadgetron: Gadgetron | None, workdir, chains=(), env=None, startup_timeout=30.0):
        self.gadgetron = gadgetron or require_gadgetron()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.chains = list(chains)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.home: Path | None = None
        self.log_path = self.workdir / "gadgetron.log"
        self.process: subprocess.Popen | None = None

    def environment(self) -> dict:
        """Environment for the server and the stock client: venv bin first on PATH, our lib first."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        lib = str(self.home / "lib") if self.home else str(self.gadgetron.lib)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [lib, env.get("LD_LIBRARY_PATH", "")] if p)
        env.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
        env.update(self.extra_env)
        return env

    def start(self) -> "GadgetronServer":
        """Start the server and wait until it accepts connections."""
        self.home = make_home(self.workdir, self.chains, self.gadgetron)
        self.port = free_port()
        work = self.workdir / "work"
        work.mkdir(exist_ok=True)
        cmd = [str(self.gadgetron.server), "--home", str(self.home), "-p", str(self.port), "-d", "1",
               "-W", str(work)]
        with open(self.log_path, "wb") as log:
            # own session: stop() can also end the gadget processes this server started
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.environment(), cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gadgetron exited with {self.process.returncode}:\n{self.log_text()}")
            if listening(self.port):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gadgetron did not accept connections on port {self.port} within "
                           f"{self.startup_timeout} s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL), then anything left in its process group."""
        if self.process is None:
            return
        pid = self.process.pid
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        try:  # gadget processes the server started (same group, led by our pid)
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process = None

    def run_client(self, args, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the stock gadgetron_ismrmrd_client against this server (host/port added)."""
        cmd = [str(self.gadgetron.client), "-a", "localhost", "-p", str(self.port), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.environment(),
                              cwd=self.workdir)

    def log_text(self) -> str:
        """Everything the server (and the gadgets it started) logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "GadgetronServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
