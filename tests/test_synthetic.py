"""Synthetic weighted images (recon/synthetic.py): the textbook formulas on the truth maps, the
settings that choose them, and their ISMRMRD images (series, meta)."""
import numpy as np
import pytest

from gadget_lorein import settings
from gadget_lorein.io import header, map_images
from gadget_lorein.recon import synthetic
from gadget_lorein.sim import phantom as ph

WM, GM, CSF = 1, 2, 3


@pytest.fixture(scope="module")
def truth():
    p = ph.head_phantom((24, 24, 16), seed=0)
    return dict(T1=p.t1, T2=p.t2, PD=p.pd, labels=p.labels)


def _formula(t1, t2, pd, tr, te, ti=None, ti2=None):
    """The textbook magnitude signals, written out independently of the module."""
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = lambda t: np.exp(-t / t1)            # noqa: E731
        if ti is None:
            mz = 1 - e1(tr)
        elif ti2 is None:
            mz = 1 - 2 * e1(ti) + e1(tr)
        else:
            mz = 1 - 2 * e1(ti2) + 2 * e1(ti) - e1(tr)
        s = 1000.0 * pd * np.abs(mz) * np.exp(-te / t2)
    return np.where((t1 > 0) & (t2 > 0), s, 0.0)


def _defaults():
    return synthetic.timings_from_settings(settings.NodeSettings(synthetic=",".join(synthetic.CONTRASTS)))


def test_each_contrast_is_the_textbook_formula_on_the_truth_maps(truth):
    timings = _defaults()
    assert list(timings) == ["T1w", "T2w", "PDw", "FLAIR", "STIR", "DIR"]
    images = synthetic.synthetic_images(truth, timings)
    for name, t in timings.items():
        ref = _formula(truth["T1"].astype(np.float64), truth["T2"].astype(np.float64),
                       truth["PD"].astype(np.float64), *t)
        assert images[name].dtype == np.float32 and images[name].shape == truth["T1"].shape
        np.testing.assert_allclose(images[name], ref, rtol=1e-5, atol=1e-4, err_msg=name)
        assert np.all(images[name][truth["labels"] == 0] == 0)


def test_the_default_timings_give_the_clinical_contrasts(truth):
    img = synthetic.synthetic_images(truth, _defaults())
    lab = truth["labels"]
    mean = {name: {t: float(np.mean(v[lab == t])) for t in (WM, GM, CSF)} for name, v in img.items()}
    assert mean["T1w"][WM] > mean["T1w"][GM] > mean["T1w"][CSF]          # T1w: CSF dark, WM bright
    assert mean["T2w"][CSF] > mean["T2w"][GM] > mean["T2w"][WM]          # T2w: CSF bright
    assert mean["PDw"][GM] > mean["PDw"][WM]
    assert mean["FLAIR"][CSF] < 0.2 * mean["FLAIR"][GM]                   # FLAIR: CSF nulled
    assert mean["FLAIR"][GM] > mean["FLAIR"][WM]
    assert mean["DIR"][CSF] < 0.2 * mean["DIR"][GM] and mean["DIR"][WM] < 0.3 * mean["DIR"][GM]


def test_the_settings_choose_contrasts_and_check_their_timings():
    ns = settings.parse({"synthetic": "flair, t1w", "synthetic_flair": "10000,100,2600"}).node
    assert synthetic.timings_from_settings(ns) == {"T1w": (500.0, 15.0), "FLAIR": (10000.0, 100.0, 2600.0)}
    assert synthetic.timings_from_settings(settings.parse({"synthetic": "none"}).node) == {}
    for bad, msg in ((("synthetic", "T1w,SWI"), "unknown contrast 'SWI'"),
                     (("synthetic_stir", "5000,30"), "must have 3 values"),
                     (("synthetic_t2w", "4000,5000"), "shorter than TR"),
                     (("synthetic_dir", "7500,25,500,3000"), "TI1"),
                     (("synthetic_pdw", "3000,-1"), "positive")):
        with pytest.raises(settings.SettingsError, match=msg):
            settings.parse(dict([bad]))


def test_synthetic_images_are_derived_series_with_pacs_meta(truth):
    geo = header.Geometry(matrix=(24, 24, 16), fov_mm=(240.0, 240.0, 160.0))
    timings = _defaults()
    vols = synthetic.synthetic_images(truth, timings)
    desc = {k: "LOREIN synthetic " + synthetic.describe(k, t) for k, t in timings.items()}
    imgs = map_images.derived_images(vols, geo, "synthetic", synthetic.SERIES, {}, desc)
    maps = map_images.maps_to_images({k: truth[k] for k in ("T1", "T2", "PD")}, geo)
    series = [i.image_series_index for i in maps + imgs]
    assert len(set(series)) == len(series) and series[3:] == [11, 12, 13, 14, 15, 16]
    flair = imgs[3].meta
    assert flair["SeriesDescription"] == "LOREIN synthetic FLAIR TR 9000 TE 90 TI 2500"
    assert flair["ImageType"] == ["DERIVED", "PRIMARY", "SYNTHETIC", "FLAIR"]
    assert flair["LOREIN_Kind"] == "synthetic" and flair["LOREIN_Map"] == "FLAIR"
    assert float(flair["WindowWidth"]) > 0 and flair["WindowCenter"] == flair["GADGETRON_WindowCenter"]
    assert maps[0].meta["ImageType"] == ["DERIVED", "PRIMARY", "QMAP", "T1"]
    back = map_images.images_to_maps(maps + imgs, kind="synthetic")
    assert sorted(back) == sorted(vols) and np.allclose(back["T2w"], vols["T2w"])
    assert sorted(map_images.images_to_maps(maps + imgs)) == ["PD", "T1", "T2"]
