"""gadget_lorein.settings: the one table, the one validator, and what is generated from them."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gadget_lorein import settings, settings_io

REPO = Path(__file__).resolve().parents[1]


def test_parse_converts_and_checks():
    p = settings.parse({"coil_subset": "8", "amp": "yes", "holdout": "0.05", "lrr_finest": "16",
                        "energy": "", "method": "CG", "images_2d": "on"})
    assert (p.recon.coil_subset, p.recon.amp, p.recon.holdout, p.recon.lrr_finest) == (8, True, 0.05, 16)
    assert p.recon.energy == 0.999 and p.recon.method == "cg" and p.node.images_2d is True
    assert settings.parse({}).recon == settings.ReconSettings()


@pytest.mark.parametrize("bad, why", [
    ({"coil_subset": "-1"}, "setting coil_subset=-1 must be >= 0"),
    ({"couple_weight": "nan"}, "setting couple_weight=nan must be a finite number >= 0"),
    ({"grid_levels": "0"}, r"setting grid_levels=0 must be in 1..32"),
    ({"grid_levels": "x"}, "setting grid_levels=x is not an integer"),
    ({"grid_log2_table": "5"}, r"grid_log2_table=5 must be 0 \(from the voxel count\) or in 10..24"),
    ({"grid_finest": "2"}, r"grid_finest=2 must be 0 \(the largest matrix dimension\) or >= grid_base \(4\)"),
    ({"lrr_finest": "2", "grid_base": "3"}, r"lrr_finest=2 must be 0 .* or >= grid_base \(3\)"),
    ({"holdout": "0.5"}, r"setting holdout=0.5 must be in \[0, 0.5\)"),
    ({"amp": "maybe"}, r"setting amp=maybe is not a boolean"),
    ({"energy": "0"}, r"setting energy=0 must be in \(0, 1\]"),
    ({"device": "abacus"}, "setting device=abacus is not a device"),
    ({"protocol": "qalas_v9"}, "setting protocol=qalas_v9 is not a shipped protocol"),
    ({"output": "all"}, "setting output=all must be one of maps, maps"),
])
def test_one_validator_names_the_setting(bad, why):
    with pytest.raises(settings.SettingsError, match=why):
        settings.parse(bad)


def test_typed_construction_is_validated_too():
    with pytest.raises(settings.SettingsError, match="holdout"):
        settings.ReconSettings(holdout=0.7)
    assert dataclasses.replace(settings.ReconSettings(), method="pmr").method == "pmr"


def test_fit_settings_are_fitconfig_fields_with_the_table_defaults():
    from gadget_lorein.recon.lorein.fit import FitConfig
    fields = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    for name in settings.FIT_NAMES:
        assert fields[name] == settings.BY_NAME[name].default
    assert FitConfig(lr=1e-3, grid_levels=6).grid_levels == 6


CHAINS_WITHOUT_SETTINGS = ("lorein_distributed_connect.xml",)   # stock workers get none: lorein serve's options


@pytest.mark.parametrize("chain", sorted(p.name for p in (REPO / "config_xml").glob("*.xml")))
def test_shipped_chains_list_exactly_the_settings_with_their_defaults(chain):
    root = ElementTree.parse(REPO / "config_xml" / chain).getroot()
    cfg = root.find(".//external/configuration")
    if chain in CHAINS_WITHOUT_SETTINGS:
        assert cfg is None
        return
    props = settings_io.chain_properties(cfg)
    assert sorted(props) == sorted(s.name for s in settings.SETTINGS)
    assert props == {s.name: settings_io.text_value(s.default) for s in settings.SETTINGS}


def test_docs_settings_md_is_generated():
    text = subprocess.run([sys.executable, "-m", "gadget_lorein.settings_io"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    assert (REPO / "docs" / "settings.md").read_text() == text
