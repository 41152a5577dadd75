"""Sequence protocols: YAML files shipped in ``gadget_lorein/physics/protocols`` (or given by path/text).

A protocol is a plain mapping (timings, flip angles, schedules, dictionary grid). Its hash, over the
canonical YAML dump, keys the on-disk subspace cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

KINDS = ("qalas", "mrf")


class ProtocolError(ValueError):
    """A protocol that does not exist or does not make sense."""


@dataclass(frozen=True)
class Protocol:
    name: str
    kind: str
    params: dict = field(repr=False)
    yaml_text: str = field(repr=False, default="")

    def __getitem__(self, key):
        return self.params[key]

    def get(self, key, default=None):
        return self.params.get(key, default)

    @property
    def hash(self) -> str:
        canon = yaml.safe_dump(self.params, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def encodes_b1(self) -> bool:
        return bool(self.params.get("encodes_b1", False))

    @property
    def n_frames(self) -> int:
        if self.kind == "qalas":
            return sum(1 for ev in self.params["events"] if "readout" in ev)
        return int(self.params["n_tr"])

    def with_overrides(self, **overrides) -> "Protocol":
        """A copy with top-level entries replaced (e.g. a coarser ``dictionary`` for tests)."""
        params = {**self.params, **overrides}
        return from_dict(params)


def available() -> list[str]:
    return sorted(p.stem for p in resources.files("gadget_lorein.physics.protocols").iterdir()
                  if p.name.endswith(".yaml"))


def from_dict(params: dict) -> Protocol:
    if not isinstance(params, dict):
        raise ProtocolError("a protocol must be a YAML mapping")
    for key in ("name", "kind"):
        if key not in params:
            raise ProtocolError(f"protocol has no '{key}' entry")
    if params["kind"] not in KINDS:
        raise ProtocolError(f"protocol kind '{params['kind']}' is not one of {KINDS}")
    if "dictionary" not in params:
        raise ProtocolError("protocol has no 'dictionary' grid")
    text = yaml.safe_dump(params, sort_keys=False)
    return Protocol(name=str(params["name"]), kind=params["kind"], params=params, yaml_text=text)


MAX_YAML_BYTES = 256 * 1024     # = limits.MAX_PROTOCOL_YAML_BYTES (no import: physics stays standalone)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong and where (line, column), without echoing the text itself."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or type(err).__name__
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(what)


def from_yaml(text: str) -> Protocol:
    """A protocol from YAML text (safe_load; no aliases, at most MAX_YAML_BYTES)."""
    if len(text) > MAX_YAML_BYTES:
        raise ProtocolError(f"protocol YAML of {len(text)} characters exceeds the limit {MAX_YAML_BYTES}")
    try:
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ProtocolError("protocol YAML uses aliases (*name); write the values out")
        params = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProtocolError(f"protocol YAML does not parse: {_yaml_problem(err)}") from None
    proto = from_dict(params)
    return Protocol(proto.name, proto.kind, proto.params, text)


def load(name_or_path: str) -> Protocol:
    """Load a shipped protocol by name (``qalas``, ``mrf``) or a YAML file by path (the operator's
    own input only: names from the data or the network go through :func:`load_shipped`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return from_yaml(path.read_text())
    return load_shipped(name_or_path)


def load_shipped(name: str) -> Protocol:
    """A shipped protocol by name; never a file path (for names that come with the data)."""
    name_or_path = str(name)
    names = available()
    if name_or_path not in names:
        shown = name_or_path if len(name_or_path) <= 80 else name_or_path[:77] + "..."
        raise ProtocolError(f"unknown protocol {shown!r}: shipped protocols are {names} (or "
                            "inline YAML in userParameter lorein.protocol_yaml)")
    text = resources.files("gadget_lorein.physics.protocols").joinpath(f"{name_or_path}.yaml").read_text()
    return from_yaml(text)
