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


def from_yaml(text: str) -> Protocol:
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProtocolError(f"protocol YAML does not parse: {err}") from None
    proto = from_dict(params)
    return Protocol(proto.name, proto.kind, proto.params, text)


def load(name_or_path: str) -> Protocol:
    """Load a shipped protocol by name (``qalas``, ``mrf``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return from_yaml(path.read_text())
    names = available()
    if name_or_path not in names:
        raise ProtocolError(f"unknown protocol '{name_or_path}': shipped protocols are {names}, "
                            "or give the path of a YAML file")
    text = resources.files("gadget_lorein.physics.protocols").joinpath(f"{name_or_path}.yaml").read_text()
    return from_yaml(text)
