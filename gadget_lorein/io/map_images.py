"""Parameter maps as ISMRMRD images: :func:`maps_to_images` (float32 images with Gadgetron meta
attributes) and its inverse :func:`images_to_maps`; :func:`write_images` / :func:`read_images` store
them as ``gadgetron_ismrmrd_client`` does (``/<group>/image_<series index>``)."""
from __future__ import annotations

import re
from typing import NamedTuple

import h5py
import ismrmrd
import numpy as np

from .header import Geometry, MRDError, _vec3


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

MAP_SERIES = {"T1": 1, "T2": 2, "PD": 3, "B1": 4}
MAP_UNITS = {"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction"}
# GADGETRON_DataRole values from gadgetron toolboxes/mri_core/mri_core_def.h
# (GADGETRON_IMAGE_T1MAP "T1", GADGETRON_IMAGE_T2MAP "T2", GADGETRON_IMAGE_PD "PD",
#  GADGETRON_IMAGE_B1MAP "B1MAP").
MAP_DATA_ROLES = {"T1": "T1", "T2": "T2", "PD": "PD", "B1": "B1MAP"}

# meta attribute names (the GADGETRON_* spellings are those of mri_core_def.h)
META_DATA_ROLE = "GADGETRON_DataRole"
META_IMAGE_COMMENT = "GADGETRON_ImageComment"
META_SEQ_DESCRIPTION = "GADGETRON_SeqDescription"
META_PROCESSING_HISTORY = "GADGETRON_ImageProcessingHistory"
META_WINDOW_CENTER = "GADGETRON_WindowCenter"
META_WINDOW_WIDTH = "GADGETRON_WindowWidth"
META_SCALE_RATIO = "GADGETRON_ScaleRatio"
META_IMAGE_NUMBER = "GADGETRON_ImageNumber"
META_MAP = "LOREIN_Map"
META_UNIT = "LOREIN_Unit"
META_METHOD = "LOREIN_Method"


VOLUME_SERIES_STRIDE = 1000   # volume v of a multi-volume stream: series 1000 x v + the image's own


class VolumeIndex(NamedTuple):
    """Which volume of a stream images belong to: its ``repetition`` and ``slice`` (slab) indices
    and its number in (repetition, slice) order, which offsets the series."""
    repetition: int = 0
    slice: int = 0
    number: int = 0


def place_volume(images: list, volume: VolumeIndex, nz: int, as_2d: bool) -> list:
    """Stamp a volume of a multi-volume stream into its images (maps, derived, coefficients):
    ``repetition``; ``slice`` the slab (3D images) or slab x nz + partition (2D images, whose
    ``slice`` is the partition); series + 1000 x the volume's number. Returns ``images``."""
    for img in images:
        img.repetition = int(volume.repetition)
        img.slice = int(volume.slice) * nz + int(img.slice) if as_2d else int(volume.slice)
        img.image_series_index = int(img.image_series_index) + VOLUME_SERIES_STRIDE * int(volume.number)
    return images


def split_volumes(images) -> dict:
    """{volume number: that volume's images} in number order (series // 1000; a single-volume
    stream is volume 0). Feed each list to :func:`images_to_maps`."""
    groups: dict = {}
    for img in images:
        groups.setdefault(int(img.image_series_index) // VOLUME_SERIES_STRIDE, []).append(img)
    return dict(sorted(groups.items()))


def _window(vol: np.ndarray) -> tuple[float, float]:
    """(centre, width) from the 1st and 99th percentiles of the finite, non-zero values."""
    v = vol[np.isfinite(vol) & (vol != 0)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1.0, 99.0])
    width = float(hi - lo)
    if not width > 0:
        width = max(abs(float(hi)), 1.0) * 1e-3
    return float((lo + hi) / 2), width


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _set_geometry(img: ismrmrd.Image, g: Geometry, position, fov, slice_index: int,
                  image_index: int, series: int) -> None:
    img.image_type = ismrmrd.IMTYPE_MAGNITUDE
    img.image_series_index = series
    img.image_index = image_index
    img.slice = slice_index
    img.measurement_uid = int(g.measurement_uid)
    img.field_of_view = tuple(float(f) for f in fov)
    img.position = tuple(float(p) for p in position)
    img.read_dir = _vec3(g.read_dir)
    img.phase_dir = _vec3(g.phase_dir)
    img.slice_dir = _vec3(g.slice_dir)
    img.patient_table_position = _vec3(g.patient_table_position)


# the names a PACS-bound chain reads (python-ismrmrd-server's mrd2dicom.py copies these meta
# attributes into the DICOM elements of the same name; ImageType as a list: DICOM's multi-value)
META_SERIES_DESCRIPTION = "SeriesDescription"
META_PACS_WINDOW_CENTER = "WindowCenter"
META_PACS_WINDOW_WIDTH = "WindowWidth"
META_IMAGE_TYPE = "ImageType"
META_KIND = "LOREIN_Kind"          # map, synthetic or confidence
IMAGE_TYPES = {"map": ["DERIVED", "PRIMARY", "QMAP"], "synthetic": ["DERIVED", "PRIMARY", "SYNTHETIC"],
               "confidence": ["DERIVED", "SECONDARY", "CONFIDENCE"]}


def _volume_images(name: str, vol, geometry: Geometry, series: int, as_2d: bool,
                   meta: dict) -> list[ismrmrd.Image]:
    """One float32 magnitude image (or one per partition) of one volume, with ``meta`` plus the
    window and the image number."""
    shape = geometry.shape
    nz = shape[0]
    vol = np.asarray(vol, dtype=np.float32)
    if vol.shape != shape:
        raise ValueError(f"map '{name}' has shape {vol.shape}; the geometry says (nz, ny, nx) = {shape}")
    vol = np.where(np.isfinite(vol), vol, np.float32(0)).astype(np.float32)
    centre, width = _window(vol)
    base_meta = {**meta, META_WINDOW_CENTER: _fmt(centre), META_WINDOW_WIDTH: _fmt(width),
                 META_PACS_WINDOW_CENTER: _fmt(centre), META_PACS_WINDOW_WIDTH: _fmt(width)}
    pos0 = np.asarray(geometry.position, dtype=float)
    sdir = np.asarray(geometry.slice_dir, dtype=float)
    dz = geometry.fov_mm[2] / nz
    if as_2d:
        parts = [(k, vol[k:k + 1], pos0 + (k - nz // 2) * dz * sdir,
                  (geometry.fov_mm[0], geometry.fov_mm[1], dz)) for k in range(nz)]
    else:
        parts = [(0, vol, pos0, geometry.fov_mm)]
    images = []
    for k, data, pos, fov in parts:
        img = ismrmrd.Image.from_array(np.ascontiguousarray(data), transpose=False)
        image_index = k + 1
        _set_geometry(img, geometry, pos, fov, k, image_index, series)
        m = ismrmrd.Meta()
        m.update(base_meta)
        m[META_IMAGE_NUMBER] = str(image_index)
        img.meta = m
        images.append(img)
    return images


def _meta(name: str, unit: str, role: str, description: str, kind: str, method: str,
          extra: dict | None) -> dict:
    out = {
        META_DATA_ROLE: role,
        META_IMAGE_COMMENT: f"{name}_{unit}",
        META_SEQ_DESCRIPTION: f"LOREIN_{name}",
        META_SERIES_DESCRIPTION: description,
        META_IMAGE_TYPE: IMAGE_TYPES[kind] + [name.upper()],
        META_PROCESSING_HISTORY: ["LOREIN", name],
        META_SCALE_RATIO: "1",
        META_MAP: name,
        META_UNIT: unit,
        META_METHOD: str(method),
        META_KIND: kind,
    }
    for k, v in (extra or {}).items():
        out[k] = v if isinstance(v, list) else str(v)
    return out


def maps_to_images(maps: dict, geometry: Geometry, units: dict | None = None, as_2d: bool = False,
                   series_offset: int = 0, extra: dict | None = None,
                   method: str = "LoREIN") -> list[ismrmrd.Image]:
    """Parameter maps {name: (nz, ny, nx)} -> float32 magnitude ISMRMRD images.

    One 3D image per map (matrix_size (nx, ny, nz), the recon FOV, position = volume centre), or
    with ``as_2d`` one image per partition (slice k at position + (k - nz//2) * dz * slice_dir,
    field_of_view z = dz, ``slice`` = k, ``image_index`` = k + 1). Series index: T1 1, T2 2, PD 3,
    B1 4, other maps 5, 6, ... in name order; plus ``series_offset``. Non-finite values become 0.
    Meta: GADGETRON_DataRole, _ImageComment ("T1_ms"), _SeqDescription, _ImageProcessingHistory,
    _WindowCenter/_WindowWidth (1st-99th percentile of the non-zero values), _ScaleRatio (1),
    _ImageNumber, SeriesDescription, WindowCenter/WindowWidth, ImageType [DERIVED, PRIMARY, QMAP, T1],
    LOREIN_Map, LOREIN_Unit, LOREIN_Method, LOREIN_Kind (map), and ``extra`` {name: value}.
    """
    units = {**MAP_UNITS, **(units or {})}
    known = [k for k in MAP_SERIES if k in maps]
    others = sorted(k for k in maps if k not in MAP_SERIES)
    series_of = {k: MAP_SERIES[k] for k in known}
    nxt = max(MAP_SERIES.values()) + 1
    for k in others:
        series_of[k] = nxt
        nxt += 1
    images = []
    for name in known + others:
        unit = str(units.get(name, "a.u."))
        meta = _meta(name, unit, MAP_DATA_ROLES.get(name, name), f"LOREIN {name} map [{unit}]", "map",
                     method, extra)
        images += _volume_images(name, maps[name], geometry, series_of[name] + int(series_offset),
                                 as_2d, meta)
    return images


def derived_images(volumes: dict, geometry: Geometry, kind: str, series: dict, units: dict,
                   descriptions: dict | None = None, as_2d: bool = False, method: str = "LoREIN",
                   extra: dict | None = None, meta: dict | None = None) -> list[ismrmrd.Image]:
    """Images computed from the maps ({name: (nz, ny, nx)}): ``kind`` 'synthetic' (weighted images,
    recon/synthetic.py) or 'confidence' (recon/confidence.py), series ``series[name]``, placed and
    labelled as :func:`maps_to_images` does (GADGETRON_DataRole ``LOREIN_<KIND>``, SeriesDescription
    ``descriptions[name]``, ImageType [DERIVED, PRIMARY, SYNTHETIC, <NAME>] or [DERIVED, SECONDARY,
    CONFIDENCE, <NAME>], LOREIN_Kind ``kind``), plus ``meta[name]`` {key: value}."""
    if kind not in ("synthetic", "confidence"):
        raise ValueError(f"unknown derived image kind {kind!r}")
    images = []
    for name, vol in volumes.items():
        unit = str(units.get(name, "a.u."))
        desc = (descriptions or {}).get(name, f"LOREIN {name}")
        own = _meta(name, unit, f"LOREIN_{kind.upper()}", desc, kind, method,
                    {**(extra or {}), **(meta or {}).get(name, {})})
        images += _volume_images(name, vol, geometry, int(series[name]), as_2d, own)
    return images


COEFFICIENT_SERIES_BASE = 100          # coefficient k (1-based) goes to series 100 + k


def coefficient_images(coeffs: np.ndarray, geometry: Geometry, as_2d: bool = False,
                       method: str = "LoREIN", source: str = "model") -> list[ismrmrd.Image]:
    """Subspace coefficient images (K, nz, ny, nx) -> complex float32 ISMRMRD images, series 101,
    102, ... (3D, or one per partition with ``as_2d``, placed as :func:`maps_to_images` does);
    meta LOREIN_Map coef1, coef2, ... and LOREIN_CoefficientSource ``source``."""
    coeffs = np.asarray(coeffs, np.complex64)
    nz = geometry.shape[0]
    dz = geometry.fov_mm[2] / nz
    pos0, sdir = np.asarray(geometry.position, float), np.asarray(geometry.slice_dir, float)
    images = []
    for k in range(coeffs.shape[0]):
        series = COEFFICIENT_SERIES_BASE + k + 1
        if as_2d:
            parts = [(z, coeffs[k, z:z + 1], pos0 + (z - nz // 2) * dz * sdir,
                      (geometry.fov_mm[0], geometry.fov_mm[1], dz)) for z in range(nz)]
        else:
            parts = [(0, coeffs[k], pos0, geometry.fov_mm)]
        for z, data, pos, fov in parts:
            img = ismrmrd.Image.from_array(np.ascontiguousarray(data), transpose=False)
            _set_geometry(img, geometry, pos, fov, z, z + 1, series)
            img.image_type = ismrmrd.IMTYPE_COMPLEX
            meta = ismrmrd.Meta()
            meta.update({META_DATA_ROLE: "LOREIN_COEFFICIENT", META_IMAGE_COMMENT: f"coef{k + 1}",
                         META_SEQ_DESCRIPTION: f"LOREIN_coef{k + 1}",
                         META_PROCESSING_HISTORY: ["LOREIN", f"coef{k + 1}"],
                         META_IMAGE_NUMBER: str(z + 1), META_MAP: f"coef{k + 1}",
                         META_UNIT: "a.u.", META_METHOD: method,
                         "LOREIN_CoefficientSource": source})
            img.meta = meta
            images.append(img)
    return images


def _meta_str(meta, key):
    v = meta.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    return v


def images_to_maps(images, kind: str = "map") -> dict:
    """Inverse of :func:`maps_to_images` (and of :func:`derived_images` with ``kind`` 'synthetic'
    or 'confidence'): {map name: (nz, ny, nx) float32} of the images of that LOREIN_Kind (images
    without one are maps). 2D images of one map are stacked in ``slice`` order; the name comes from
    LOREIN_Map (else GADGETRON_DataRole)."""
    inv_roles = {v: k for k, v in MAP_DATA_ROLES.items()}
    groups: dict[str, list] = {}
    for img in images:
        meta = img.meta
        if (_meta_str(meta, META_KIND) or "map") != kind:
            continue
        name = _meta_str(meta, META_MAP)
        if name is None:
            role = _meta_str(meta, META_DATA_ROLE)
            name = inv_roles.get(role, role) if role is not None else f"series_{img.image_series_index}"
        groups.setdefault(name, []).append(img)
    out = {}
    for name, imgs in groups.items():
        if len(imgs) == 1:
            d = np.asarray(imgs[0].data)
            out[name] = np.array(d[0] if d.shape[0] == 1 else d, dtype=np.float32)
            continue
        imgs = sorted(imgs, key=lambda im: (int(im.slice), int(im.image_index)))
        out[name] = np.concatenate([np.asarray(im.data)[0] for im in imgs], axis=0).astype(np.float32)
    return out


def write_images(path, group: str, images) -> None:
    """Append images to ``/<group>/image_<image_series_index>`` (gadgetron_ismrmrd_client layout)."""
    ds = ismrmrd.Dataset(str(path), group, create_if_needed=True)
    try:
        for img in images:
            ds.append_image(f"image_{int(img.image_series_index)}", img)
    finally:
        ds.close()


def _series_key(name: str):
    m = re.fullmatch(r"image_(\d+)", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def read_images(path, group: str | None = None) -> list[ismrmrd.Image]:
    """All images of ``group`` (None: the only group, else the first in name order), series by
    series. The file is opened read-only."""
    out = []
    with h5py.File(path, "r") as f:
        if group is None:
            groups = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
            if not groups:
                raise MRDError(f"{path} has no groups")
            group = groups[0]
        if group not in f:
            raise MRDError(f"{path} has no group '{group}'")
        g = f[group]
        for name in sorted(g.keys(), key=_series_key):
            sub = g[name]
            if not (isinstance(sub, h5py.Group) and "header" in sub and "data" in sub):
                continue
            heads, attrs, data = sub["header"], sub.get("attributes"), sub["data"]
            for i in range(heads.shape[0]):
                a = "" if attrs is None else attrs[i]
                if isinstance(a, bytes):
                    a = a.decode("utf-8")
                img = ismrmrd.Image(heads[i].tobytes(), attribute_string=a)
                d = data[i]
                if d.dtype.names and "real" in d.dtype.names:
                    d = d["real"] + 1j * d["imag"]
                img.data[:] = d.reshape(img.data.shape)
                out.append(img)
    return out
