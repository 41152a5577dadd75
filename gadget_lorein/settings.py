"""Every setting of the reconstruction and of the node, declared once (``SETTINGS``).

From the table come: ``ReconSettings`` (the reconstruction's settings, a dataclass), ``NodeSettings``
(the gadget's own), the user-facing fields of ``recon.lorein.fit.FitConfig`` (:func:`fit_fields`),
the parser of the chain's properties and of every other mapping (:func:`parse`, the one
validator), and, through settings_io.py, the options of ``lorein recon`` / ``serve`` / ``demo`` and
the table in docs/settings.md (``python -m gadget_lorein.settings_io > docs/settings.md``).

The chain's ``<property name=... value=.../>``, ``lorein serve`` / ``recon`` options (``-`` for
``_``) and ``benchmarks/accuracy.py --set`` use the same names. Values may be strings (the chain's)
or typed; an empty string means the default. Booleans: true/false, 1/0, yes/no, on/off.

Only the standard library is imported here (the CLI builds its options from this module before
anything heavy is loaded).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

METHODS = ("lorein", "pmr", "lrr", "cg", "llr", "zerofill")
NETWORK_METHODS = ("lorein", "pmr", "lrr")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_DEVICE = re.compile(r"^(auto|(cpu|cuda|mps|xpu)(:\d+)?)$")


class SettingsError(ValueError):
    """A setting with a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Setting:
    name: str
    type: type                       # int, float, str or bool
    default: Any
    help: str                        # one line
    scope: str = "recon"             # recon: ReconSettings; node: NodeSettings (the gadget's own)
    fit: bool = False                # also a field of recon.lorein.fit.FitConfig
    low: float | None = None         # allowed range (inclusive unless *_open)
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()              # (value, meaning): allowed outside the range, e.g. (0, "automatic")
    choices: tuple = ()              # allowed values (case-insensitive)
    at_least: str = ""               # cross-field: >= this setting (unless the special value)
    allowed: str = ""                # the allowed values in words, where no range says it

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """The allowed values, in words: 'in 1..32', '>= 0', 'in (0, 1]', 'one of a, b'."""
        if self.allowed:
            return self.allowed
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.type is bool:
            return "true or false"
        if self.low is None and self.high is None:
            rng = ""
        elif self.type is int and not (self.low_open or self.high_open):
            rng = (f">= {self.low:g}" if self.high is None else f"in {self.low:g}..{self.high:g}")
        elif self.high is None:
            rng = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            rng = (f"in {'(' if self.low_open else '['}{self.low:g}, "
                   f"{self.high:g}{')' if self.high_open else ']'}")
        if self.at_least:
            rng = f">= {self.at_least}"
        if self.special:
            value, meaning = self.special
            inside = self.low is not None and value >= self.low and not self.at_least
            rng = f"{rng} ({value}: {meaning})" if inside else f"{value} ({meaning}) or {rng}"
        return rng


SYNTHETIC_CONTRASTS = ("T1w", "T2w", "PDw", "FLAIR", "STIR", "DIR")
_TIMING_TEXT = "TR,TE or TR,TE,TI in ms"
# how many timings (TR, TE, TI, TI2) each synthetic contrast takes
_TIMING_COUNTS = {"T1w": (2, 3), "T2w": (2, 3), "PDw": (2, 3), "FLAIR": (3,), "STIR": (3,), "DIR": (4,)}


def synthetic_timing(contrast: str, text: str) -> tuple[float, ...]:
    """(TR, TE[, TI[, TI2]]) in ms from a synthetic_* setting's text; raises SettingsError."""
    bad = f"setting synthetic_{contrast.lower()}={text}"
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise SettingsError(f"{bad} is not a comma list of numbers (ms)") from None
    counts = _TIMING_COUNTS[contrast]
    if len(values) not in counts:
        raise SettingsError(f"{bad} must have {' or '.join(map(str, counts))} values (TR,TE"
                            f"{',TI' if max(counts) > 2 else ''}{',TI2' if 4 in counts else ''})")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise SettingsError(f"{bad}: every time must be a positive number of ms")
    tr, te, rest = values[0], values[1], values[2:]
    if te >= tr or any(ti >= tr for ti in rest):
        raise SettingsError(f"{bad}: TE and TI must be shorter than TR")
    if len(rest) == 2 and rest[1] >= rest[0]:
        raise SettingsError(f"{bad}: TI1 (first inversion) must be longer than TI2")
    return values


def synthetic_selection(text: str) -> tuple[str, ...]:
    """The contrasts named by the ``synthetic`` setting (case-insensitive; none or empty: ())."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if [n.lower() for n in names] in (["none"], ["off"]):
        return ()
    by_lower = {c.lower(): c for c in SYNTHETIC_CONTRASTS}
    out = []
    for n in names:
        if n.lower() not in by_lower:
            raise SettingsError(f"setting synthetic={text}: unknown contrast {n!r}; known: "
                                f"{', '.join(SYNTHETIC_CONTRASTS)} (or none)")
        if by_lower[n.lower()] not in out:
            out.append(by_lower[n.lower()])
    return tuple(out)


def _s(name, typ, default, help, **kw) -> Setting:
    return Setting(name, typ, default, help, **kw)


SETTINGS: tuple[Setting, ...] = (
    _s("method", str, "lorein", "reconstruction method: lorein (joint low-rank + parameter-map "
       "networks), pmr, lrr, cg (subspace CG + dictionary matching), llr (locally low-rank), zerofill",
       choices=METHODS),
    _s("device", str, "auto", "where the reconstruction runs: auto = cuda if torch sees one, else cpu",
       allowed="auto, cpu, cuda, cuda:N (also mps, xpu)"),
    _s("rank", int, 0, "subspace rank K", low=0, special=(0, "the smallest K capturing energy")),
    _s("energy", float, 0.999, "dictionary energy the subspace must capture when rank is 0",
       low=0.0, high=1.0, low_open=True),
    _s("iterations", int, 0, "iterations of the method (lorein/pmr/lrr 200, or 400 beyond 32 frames, "
       "with early stop; cg 30, llr 80)", low=0, special=(0, "the method's default")),
    _s("coil_maps", str, "lowres", "coil sensitivities from the calibration region: lowres (windowed "
       "low-resolution images) or espirit (needs at least 6 x 6 calibration lines)",
       choices=("lowres", "espirit")),
    _s("virtual_coils", int, 0, "compress to this many virtual coils", low=0,
       special=(0, "no compression")),
    _s("coil_batch", int, 0, "coils per FFT batch in the fit; smaller needs less GPU memory (halved "
       "automatically when the GPU runs out, then the CPU)", low=0, special=(0, "all coils")),
    _s("coil_subset", int, 0, "speed: coils drawn at random per fit step for the data terms (an "
       "unbiased estimate, fewer FFTs, a noisier fit)", low=0, special=(0, "all coils"), fit=True),
    _s("amp", bool, False, "speed: the fit's network MLPs in bfloat16 (for GPUs)", fit=True),
    _s("coil_refine", int, 8, "lorein/pmr/lrr: coil maps refined jointly with the fit, a smooth "
       "correction of this many central k-space coefficients per axis", low=0, special=(0, "off"),
       fit=True),
    _s("couple_weight", float, 0.1, "lorein: weight of the coupling between the PMR and LRR blocks "
       "(0: independent blocks, the maps are PMR's)", low=0.0, fit=True),
    _s("grid_levels", int, 12, "lorein/pmr/lrr, both networks: hash-grid resolution levels",
       low=1, high=32, fit=True),
    _s("grid_features", int, 2, "features per hash-grid level", low=1, high=16, fit=True),
    _s("grid_log2_table", int, 0, "log2 of the hash-table entries per level", low=10, high=24,
       special=(0, "from the voxel count"), fit=True),
    _s("grid_base", int, 4, "coarsest hash-grid resolution (cells per axis)", low=1, fit=True),
    _s("grid_finest", int, 0, "finest hash-grid resolution", low=1, at_least="grid_base",
       special=(0, "the largest matrix dimension"), fit=True),
    _s("mlp_width", int, 64, "hidden units per layer of the networks' MLP heads", low=1, fit=True),
    _s("mlp_layers", int, 2, "hidden layers of the MLP heads (0: a linear head)", low=0, high=16,
       fit=True),
    _s("lrr_finest", int, 0, "lorein: the LRR block's finest hash-grid resolution", low=1,
       at_least="grid_base", special=(0, "the PMR block's own"), fit=True),
    _s("protocol", str, "", "sequence protocol: empty = the one in the data, else a shipped name "
       "(qalas, mrf) or a YAML path", allowed="empty, a shipped name, a .yaml file"),
    _s("seed", int, 0, "seed of the network initialisation and of the held-out lines (CPU results "
       "repeat exactly)", allowed="an integer"),
    _s("holdout", float, 0.05, "lorein/pmr/lrr: fraction of the measured lines held out of the fit "
       "to choose when to stop (0: every line fitted, the last step's maps)", low=0.0, high=0.5,
       high_open=True),
    _s("support_threshold", float, 0.08, "object support: low-resolution image above this fraction "
       "of its 99th percentile (raised over a bright background, docs/design.md); maps are 0 "
       "outside, and in its ringing islands (parts whose peak stays under 3x this)", low=0.0, high=1.0, high_open=True),
    _s("output", str, "maps", "maps: the parameter maps; maps+coefficients: also the K subspace "
       "coefficient images (series 101, 102, ...)", scope="node", choices=("maps", "maps+coefficients")),
    _s("images_2d", bool, False, "one 2D image per partition and map instead of one 3D image per map",
       scope="node"),
    _s("synthetic", str, "T1w,T2w,PDw,FLAIR,STIR", "synthetic weighted images computed from the maps "
       "and sent as series 11-16 (recon/synthetic.py; none: no synthetic images)", scope="node",
       allowed="none or a comma list of " + ", ".join(SYNTHETIC_CONTRASTS)),
    _s("synthetic_t1w", str, "500,15", "T1w: spin echo TR,TE in ms (TR,TE,TI for inversion recovery)",
       scope="node", allowed=_TIMING_TEXT),
    _s("synthetic_t2w", str, "4000,100", "T2w: spin echo TR,TE in ms", scope="node", allowed=_TIMING_TEXT),
    _s("synthetic_pdw", str, "3000,15", "PDw: spin echo TR,TE in ms", scope="node", allowed=_TIMING_TEXT),
    _s("synthetic_flair", str, "9000,90,2500", "FLAIR: inversion recovery TR,TE,TI in ms (CSF "
       "nulled)", scope="node", allowed="TR,TE,TI in ms"),
    _s("synthetic_stir", str, "5000,30,220", "STIR: inversion recovery TR,TE,TI in ms (short TI)",
       scope="node", allowed="TR,TE,TI in ms"),
    _s("synthetic_dir", str, "7500,25,3230,540", "DIR: double inversion recovery TR,TE,TI1,TI2 in ms "
       "(defaults null CSF and white matter)", scope="node", allowed="TR,TE,TI1,TI2 in ms, TI1 > TI2"),
    _s("confidence", bool, True, "send the Cramér-Rao standard deviation of T1, T2 (and B1) as series "
       "21-24 and the undetermined voxels as series 25 (recon/confidence.py)", scope="node"),
    _s("confidence_max_rel_sd", float, 0.5, "a voxel is marked undetermined (series 25) where the "
       "standard deviation of T1 or T2 exceeds this fraction of its value", scope="node", low=0.0,
       low_open=True),
    _s("log_level", str, "INFO", "level of the gadget_lorein loggers", scope="node",
       choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    _s("max_memory_gb", float, 0.0, "memory ceiling of one reconstruction in GB (gadget_lorein/"
       "limits.py lists every other limit)", scope="node", low=0.0,
       special=(0, "80 % of the memory available")),
    _s("threads", int, 0, "CPU threads of one reconstruction (with several reconstructions at once: "
       "cores / reconstructions)", scope="node", low=1, special=(0, "torch's default, all cores")),
    _s("device_slots", int, 0, "fits that run at once on one device, across processes on the "
       "machine; the others wait in a queue (a file lock per slot)", scope="node", low=1,
       special=(0, "1 per GPU, no queue on the CPU")),
)
BY_NAME = {s.name: s for s in SETTINGS}
RECON_NAMES = tuple(s.name for s in SETTINGS if s.scope == "recon")
NODE_NAMES = tuple(s.name for s in SETTINGS if s.scope == "node")
FIT_NAMES = tuple(s.name for s in SETTINGS if s.fit)


# --------------------------------------------------------------------------------------------
# the one validator
# --------------------------------------------------------------------------------------------

def _shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip() if isinstance(value, str) else repr(value)


def convert(s: Setting, value) -> Any:
    """One value (string or typed) -> the setting's type, checked against its range / choices."""
    text = _shown(value)
    bad = f"setting {s.name}={text}"
    if s.type is bool:
        if isinstance(value, bool):
            return value
        v = text.lower()
        if v in TRUE or v in FALSE:
            return v in TRUE
        raise SettingsError(f"{bad} is not a boolean (true/false, 1/0, yes/no, on/off)")
    if s.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = int(text)
            except ValueError:
                raise SettingsError(f"{bad} is not an integer") from None
    elif s.type is float:
        try:
            v = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
                else float(text)
        except ValueError:
            raise SettingsError(f"{bad} is not a number") from None
        if not math.isfinite(v):
            raise SettingsError(f"{bad} must be a finite number {s.range_text()}".rstrip())
    else:
        v = text
    if s.choices:
        match = [c for c in s.choices if c.lower() == v.lower()]
        if not match:
            raise SettingsError(f"{bad} must be {s.range_text()}")
        return match[0]
    if s.special and v == s.special[0]:
        return v
    if s.type in (int, float):
        low_bad = s.low is not None and (v <= s.low if s.low_open else v < s.low)
        high_bad = s.high is not None and (v >= s.high if s.high_open else v > s.high)
        if low_bad or high_bad:
            rng = s.range_text() if not s.at_least else \
                Setting(**{**dataclasses.asdict(s), "at_least": ""}).range_text()
            raise SettingsError(f"{bad} must be {rng}")
    check = _CHECKS.get(s.name)
    if check is not None:
        check(s, v, bad)
    return v


def _check_device(s, v, bad):
    if not _DEVICE.match(v):
        raise SettingsError(f"{bad} is not a device: {s.allowed}")


def _check_protocol(s, v, bad):
    if not v:
        return
    from .physics import protocol as protocol_mod     # pyyaml only
    path = Path(v)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SettingsError(f"{bad}: no such file")
        return
    names = protocol_mod.available()
    if v not in names:
        raise SettingsError(f"{bad} is not a shipped protocol ({', '.join(names)}) nor a .yaml file")


def _check_synthetic(s, v, bad):
    synthetic_selection(v)


def _check_timing(s, v, bad):
    synthetic_timing({c.lower(): c for c in SYNTHETIC_CONTRASTS}[s.name.split("_", 1)[1]], v)


_CHECKS = {"device": _check_device, "protocol": _check_protocol, "synthetic": _check_synthetic,
           **{f"synthetic_{c.lower()}": _check_timing for c in SYNTHETIC_CONTRASTS}}


def check_all(values: Mapping[str, Any]) -> None:
    """The cross-field checks on typed values (a complete set of one scope)."""
    for s in SETTINGS:
        if s.at_least and s.name in values and s.at_least in values:
            v, ref = values[s.name], values[s.at_least]
            if not (s.special and v == s.special[0]) and v < ref:
                raise SettingsError(f"setting {s.name}={v} must be {s.special[0]} ({s.special[1]}) "
                                    f"or >= {s.at_least} ({ref})")


def _typed(values: Mapping | None, names: Iterable[str]) -> dict:
    out = {}
    for key, val in (values or {}).items():
        if key in names and val is not None and not (isinstance(val, str) and not val.strip()):
            out[key] = convert(BY_NAME[key], val)
    return out


def _validate(self) -> None:
    """__post_init__ of the generated classes: every field converted and checked."""
    for f in dataclasses.fields(self):
        object.__setattr__(self, f.name, convert(BY_NAME[f.name], getattr(self, f.name)))
    check_all(dataclasses.asdict(self))


def _from_mapping(cls, values: Mapping | None):
    """The class's settings from a mapping (strings or typed; empty = default); other names are
    ignored. Raises SettingsError naming a bad value."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**_typed(values, names))


def _make(name: str, scope: str, doc: str):
    return dataclasses.make_dataclass(
        name, [(s.name, s.type, field(default=s.default)) for s in SETTINGS if s.scope == scope],
        namespace={"__doc__": doc, "__post_init__": _validate, "from_mapping": classmethod(_from_mapping),
                   "__module__": __name__})


ReconSettings = _make("ReconSettings", "recon", "The reconstruction's settings (the table SETTINGS, "
                      "scope recon); validated on construction.")
NodeSettings = _make("NodeSettings", "node", "The gadget's own settings (the table SETTINGS, scope "
                     "node); validated on construction.")


@dataclass(frozen=True)
class Settings:
    """A parsed settings mapping: the reconstruction's, the node's, and the names given."""
    recon: ReconSettings = field(default_factory=ReconSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    given: tuple = ()


def parse(values: Mapping | None, unknown: str = "warn") -> Settings:
    """THE validator: a mapping of settings (the chain's properties, the CLI's options, serve's
    overrides, a benchmark's --set) -> Settings. Empty values mean the default. ``unknown``: warn
    (log a warning), ignore, or error. Raises SettingsError naming the first bad setting."""
    values = {str(k): v for k, v in (values or {}).items() if k is not None}
    extra = sorted(k for k in values if k not in BY_NAME)
    if extra and unknown == "error":
        raise SettingsError(f"unknown setting(s) {', '.join(extra)}; known: {', '.join(BY_NAME)}")
    if extra and unknown == "warn":
        log.warning("ignoring unknown setting(s) %s; known: %s", ", ".join(extra), ", ".join(BY_NAME))
    given = {k: v for k, v in values.items()
             if k in BY_NAME and v is not None and not (isinstance(v, str) and not v.strip())}
    rs = ReconSettings.from_mapping(given)
    ns = NodeSettings.from_mapping(given)
    from . import limits
    limits.check_settings(rs)       # the sizes a stranger could ask for (limits.py)
    return Settings(rs, ns, tuple(given))


def fit_fields(cls):
    """Class decorator (recon.lorein.fit.FitConfig): adds the fit settings of the table as fields,
    with their defaults, then makes ``cls`` a dataclass. The class keeps its own internal fields."""
    ann = cls.__dict__.get("__annotations__", {})
    cls.__annotations__ = ann
    for s in SETTINGS:
        if s.fit and s.name not in ann:
            ann[s.name] = s.type.__name__
            setattr(cls, s.name, s.default)
    return dataclass(cls)
