"""The settings as the command line, a chain and the docs write them: one option per setting
(:func:`add_arguments`, :func:`from_args`), a chain's ``<property>`` list (:func:`chain_properties`,
:func:`text_value`) and docs/settings.md (:func:`markdown`; ``python -m gadget_lorein.settings_io >
docs/settings.md``). Everything comes from ``settings.SETTINGS``; values are checked by
``settings.parse``. Only the standard library is imported (the CLI builds its options first)."""
from __future__ import annotations

from typing import Iterable

from .settings import SETTINGS

def text_value(value) -> str:
    """A value as a chain property writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_arguments(parser, scopes=("recon", "node"), exclude: Iterable[str] = ()) -> None:
    """One option per setting (``--name-with-dashes``, dest ``set_<name>``, default None = not
    given); bools as flags (--amp / --no-amp). Values are checked by :func:`parse` afterwards."""
    import argparse
    skip = set(exclude)
    for s in SETTINGS:
        if s.scope not in scopes or s.name in skip:
            continue
        default = text_value(s.default) if s.default != "" else "empty"
        rng = s.range_text()
        help_text = f"{s.help} ({rng}; " if rng and s.type is not bool else f"{s.help} ("
        help_text = (help_text + f"default {default})").replace("%", "%%")
        kw = dict(dest=f"set_{s.name}", default=None, help=help_text)
        if s.type is bool:
            parser.add_argument(s.option, action=argparse.BooleanOptionalAction, **kw)
        else:
            metavar = {int: "N", float: "X"}.get(s.type, "NAME" if not s.choices else "|".join(s.choices))
            parser.add_argument(s.option, metavar=metavar, **kw)


def from_args(args) -> dict:
    """The settings given on the command line (by :func:`add_arguments`), by setting name."""
    out = {}
    for s in SETTINGS:
        v = getattr(args, f"set_{s.name}", None)
        if v is not None:
            out[s.name] = v
    return out


def chain_properties(config) -> dict:
    """{name: value} of the ``<property>`` children of a chain's <configuration> (None: {})."""
    if config is None:
        return {}
    return {p.get("name"): p.get("value") for p in config.findall("property")}


def markdown() -> str:
    """docs/settings.md."""
    rows = ["# Settings", "",
            "Generated from `gadget_lorein/settings.py` by `python -m gadget_lorein.settings_io > "
            "docs/settings.md`; do not edit by hand.", "",
            "The same names everywhere: the chain's `<property name=... value=.../>` (config_xml/), "
            "`lorein recon` / `serve` / `demo` options (`--name-with-dashes`; booleans as flags, "
            "`--no-...` to turn off), `benchmarks/accuracy.py --set NAME=VALUE`. Empty means the "
            "default. Booleans: true/false, 1/0, yes/no, on/off. Scope recon: the reconstruction "
            "(`ReconSettings`); node: the gadget's own (images it sends, logging). Fit: also a field "
            "of `recon.lorein.fit.FitConfig`.", "",
            "| name | type | default | allowed | scope | meaning |",
            "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{text_value(s.default)}`" if s.default != "" else "(empty)"
        scope = s.scope + (", fit" if s.fit else "")
        rows.append(f"| `{s.name}` | {s.type.__name__} | {default} | {s.range_text() or 'any'} | "
                    f"{scope} | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys
    sys.stdout.write(markdown())
