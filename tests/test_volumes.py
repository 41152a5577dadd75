"""Multi-volume streams (issue #34): several repetitions (or slabs) in one stream, each buffered
and reconstructed as soon as it is complete (io/volumes.py, node/gadget.process), the simulator's
``--repetitions``, the image numbering of volumes, the limits on buffered volumes, and the
concurrency controls (concurrency.py: threads, per-device slots).

The scans are 16 x 16 x 8 with 4 coils and reconstructed with cg, 5 iterations: each volume takes
well under a second."""
from __future__ import annotations

import logging
import threading
import time

import ismrmrd
import numpy as np
import pytest

from gadget_lorein import concurrency, limits
from gadget_lorein.io import header, map_images, rawfile, volumes
from gadget_lorein.io.buffer import AcquisitionBuffer
from gadget_lorein.node import gadget
from gadget_lorein.physics import protocol as protocol_mod
from gadget_lorein.physics import sequences
from gadget_lorein.sim import files, sampling, simulate

FAST = {"method": "cg", "iterations": "5", "coil_maps": "lowres"}
PLAN = dict(matrix=(16, 16, 8), n_coils=4, accel=8.0, seed=3, mode="ideal", noise=0.01)
LAST_BITS = [1 << (f - 1) for f in (ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_REPETITION,
                                    ismrmrd.ACQ_LAST_IN_MEASUREMENT)]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A 2-repetition file, and each repetition alone as a single-volume file."""
    d = tmp_path_factory.mktemp("volumes")
    proto = protocol_mod.load("qalas")
    sims = [simulate.simulate(proto, **PLAN, noise_seed=files.repetition_noise_seed(PLAN["seed"], r))
            for r in range(2)]
    calib = sampling.calib_region(16, 8, _calib(sims[0]))
    common = (proto.name, proto.yaml_text, sims[0].scan.fov_mm, sequences.sequence_parameters(proto))
    rawfile.write_raw(d / "rep2.h5", [s.scan.lines for s in sims], None, calib,
                      [s.scan.noise for s in sims], *common)
    singles = []
    for r, s in enumerate(sims):
        rawfile.write_raw(d / f"single{r}.h5", s.scan.lines, None, calib, s.scan.noise, *common)
        singles.append(d / f"single{r}.h5")
    return d / "rep2.h5", singles


def _calib(sim):
    lines = sim.scan.lines
    z, y = lines.kz[lines.calib], lines.ky[lines.calib]
    return (int(y.max() - y.min() + 1), int(z.max() - z.min() + 1))


def run(xml, items, settings=None):
    sent = []
    gadget.process(xml, items, {**FAST, **(settings or {})}, sent.append)
    return [x for x in sent if isinstance(x, ismrmrd.Image)]


def maps_by_volume(images):
    return {v: map_images.images_to_maps(ims) for v, ims in map_images.split_volumes(images).items()}


def check_series(images, n_volumes):
    """Volume v's series (maps 1-3, synthetic 11-, confidence 21-) are volume 0's + 1000 v, and
    every (series, image) once."""
    series = [int(i.image_series_index) for i in images]
    assert len(series) == len(set(series))
    first = {x for x in series if x < 1000}
    assert {1, 2, 3} <= first and any(10 < x < 30 for x in first)
    assert sorted(series) == sorted(x + 1000 * v for v in range(n_volumes) for x in first)


def acquisitions(path):
    xml, acqs = rawfile.iter_raw(path)
    return xml, list(acqs)


def interleave(acqs):
    """Noise first, then the two repetitions' lines alternately (flags unchanged)."""
    noise = [a for a in acqs if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    reps = [[a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and a.idx.repetition == r]
            for r in range(2)]
    out = list(noise)
    for a, b in zip(*reps):
        out += [a, b]
    return out


def test_each_repetition_equals_its_single_volume_reconstruction(scans):
    rep2, singles = scans
    xml, acqs = acquisitions(rep2)
    images = run(xml, acqs)
    check_series(images, 2)
    assert {(int(i.image_series_index) // 1000, int(i.repetition), int(i.slice)) for i in images} == \
        {(0, 0, 0), (1, 1, 0)}
    got = maps_by_volume(images)
    for r, single in enumerate(singles):
        ref = maps_by_volume(run(*acquisitions(single)))[0]
        for name in ("T1", "T2", "PD"):
            np.testing.assert_array_equal(got[r][name], ref[name])
    assert not np.array_equal(got[0]["T1"], got[1]["T1"])      # fresh noise per repetition


def test_interleaved_repetitions_give_the_same_maps(scans):
    xml, acqs = acquisitions(scans[0])
    seq = maps_by_volume(run(xml, acqs))
    inter = maps_by_volume(run(xml, interleave(acqs)))
    for r in (0, 1):
        for name in seq[r]:
            np.testing.assert_array_equal(seq[r][name], inter[r][name])


def test_a_volume_is_reconstructed_as_soon_as_its_last_line_arrives(scans):
    xml, acqs = acquisitions(scans[0])
    sent_at = []

    def items():
        for i, a in enumerate(acqs):
            sent_at.append(i)
            yield a
    done = []
    gadget.process(xml, items(), FAST, lambda img: done.append(sent_at[-1]))
    first_rep1 = next(i for i, a in enumerate(acqs) if a.idx.repetition == 1)
    half = len(done) // 2
    assert max(done[:half]) < first_rep1 and min(done[half:]) == len(acqs) - 1


def test_slabs_are_volumes_closed_by_last_in_slice(scans):
    """The 2-repetition scan relabelled as one repetition of two slabs (slice 0, 1): slab 0 is
    complete at its ACQ_LAST_IN_SLICE (ACQ_LAST_IN_REPETITION only on the last line of all)."""
    xml, acqs = acquisitions(scans[0])
    h = ismrmrd.xsd.CreateFromDocument(xml)
    lim = h.encoding[0].encodingLimits
    lim.slice.maximum, lim.repetition.maximum = 1, 0
    rep_bit = 1 << (ismrmrd.ACQ_LAST_IN_REPETITION - 1)
    for a in acqs:
        a.idx.slice, a.idx.repetition = a.idx.repetition, 0
        if a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) and not a.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            a.flags = int(a.flags) & ~rep_bit
    done, seen = [], []

    def items():
        for a in acqs:
            seen.append(int(a.idx.slice))
            yield a
    sent = []
    gadget.process(ismrmrd.xsd.ToXML(h), items(), FAST, lambda x: (sent.append(x), done.append(seen.count(1))))
    check_series(sent, 2)
    assert {(int(i.image_series_index) // 1000, int(i.repetition), int(i.slice)) for i in sent} == \
        {(0, 0, 0), (1, 0, 1)}
    half = len(sent) // 2
    assert done[:half] == [0] * half      # slab 0's images left before any line of slab 1 was read


def test_end_of_stream_completes_volumes_without_last_flags(scans, caplog):
    xml, acqs = acquisitions(scans[0])
    for a in acqs:
        a.flags = int(a.flags) & ~sum(LAST_BITS)
    with caplog.at_level(logging.WARNING, "gadget_lorein"):
        images = run(xml, acqs)
    check_series(images, 2)
    assert "stream ended before ACQ_LAST_IN_SLICE" in caplog.text


def test_a_cut_volume_is_an_error_not_maps(scans):
    xml, acqs = acquisitions(scans[0])
    cut = acqs[:-10]                    # repetition 1 loses its last 10 lines (and its flags)
    sent = []
    with pytest.raises(header.MRDError, match="repetition 1 slice 0 has 70 of 80 lines"):
        gadget.process(xml, cut, FAST, sent.append)
    assert {int(i.repetition) for i in sent if isinstance(i, ismrmrd.Image)} == {0}   # rep 0 was sent


def test_lines_after_their_volume_was_reconstructed_are_refused(scans):
    xml, acqs = acquisitions(scans[0])
    late = next(a for a in acqs if a.idx.repetition == 0 and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
    rep1 = [a for a in acqs if a.idx.repetition == 1]
    stream = [a for a in acqs if a.idx.repetition == 0] + rep1[:5] + [late] + rep1[5:]
    with pytest.raises(header.MRDError, match="after that volume was complete"):
        run(xml, stream)


def test_buffered_volumes_are_bounded_in_number_and_memory(scans, monkeypatch):
    xml, acqs = acquisitions(scans[0])
    monkeypatch.setattr(limits, "MAX_OPEN_VOLUMES", 1)
    with pytest.raises(limits.ResourceError, match="volumes buffered at once = 2 exceeds the limit 1"):
        run(xml, interleave(acqs))
    monkeypatch.undo()
    one = AcquisitionBuffer(xml, volumes=True)
    one.add(next(a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)))
    router = volumes.VolumeRouter(xml, max_bytes=int(1.5 * one.nbytes))  # one volume's lines fit, two not
    with pytest.raises(limits.ResourceError, match="memory limit"):
        for a in interleave(acqs):
            router.add(a)


def test_header_volume_limits(scans):
    xml, _ = acquisitions(scans[0])
    with pytest.raises(header.MRDError, match="only one repetition is supported here"):
        AcquisitionBuffer(xml)                       # read_raw & co: one volume only
    h = ismrmrd.xsd.CreateFromDocument(xml)
    h.encoding[0].encodingLimits.repetition.maximum = limits.MAX_VOLUMES
    with pytest.raises(limits.ResourceError, match="volumes"):
        volumes.VolumeRouter(ismrmrd.xsd.ToXML(h), 1 << 30)
    h.encoding[0].encodingLimits.repetition.maximum = 0
    h.encoding[0].encodingLimits.set.maximum = 1
    with pytest.raises(header.MRDError, match="set up to 1"):
        volumes.VolumeRouter(ismrmrd.xsd.ToXML(h), 1 << 30)


def test_volume_numbering_of_3d_and_2d_images():
    g = header.Geometry((8, 6, 4), (80.0, 60.0, 40.0))
    maps = {"T1": np.ones((4, 6, 8), np.float32), "T2": np.ones((4, 6, 8), np.float32)}
    vol = map_images.VolumeIndex(repetition=1, slice=2, number=5)
    three = map_images.place_volume(map_images.maps_to_images(maps, g), vol, 4, False)
    assert [(i.image_series_index, i.repetition, i.slice) for i in three] == [(5001, 1, 2), (5002, 1, 2)]
    two = map_images.place_volume(map_images.maps_to_images(maps, g, as_2d=True), vol, 4, True)
    assert [i.slice for i in two if i.image_series_index == 5001] == [8, 9, 10, 11]
    assert map_images.images_to_maps(two)["T1"].shape == (4, 6, 8)
    assert list(map_images.split_volumes(three + map_images.maps_to_images(maps, g))) == [0, 5]


def test_simulate_cli_writes_repetitions(tmp_path):
    from gadget_lorein import cli
    raw = tmp_path / "r3.h5"
    assert cli.main(["simulate", "--sequence", "qalas", "--matrix", "16", "16", "8", "--coils", "4",
                     "--repetitions", "3", "-o", str(raw), "-q"]) == 0
    xml, acqs = acquisitions(raw)
    h = ismrmrd.xsd.CreateFromDocument(xml)
    assert h.encoding[0].encodingLimits.repetition.maximum == 2
    data = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert sorted({int(a.idx.repetition) for a in data}) == [0, 1, 2]
    assert sum(a.is_flag_set(ismrmrd.ACQ_LAST_IN_REPETITION) for a in data) == 3
    assert sum(a.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT) for a in data) == 1


# --------------------------------------------------------------------------------------------
# concurrency
# --------------------------------------------------------------------------------------------

def test_threads_setting_bounds_torch_threads():
    import torch
    before = torch.get_num_threads()
    try:
        concurrency.set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_slots_queue_fits_and_log_the_wait(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOREIN_SLOT_DIR", str(tmp_path))
    assert concurrency.slot_count("cpu", 0) == 0 and concurrency.slot_count("cuda", 0) == 1
    order = []
    first_in = threading.Event()

    def fit(name, hold):
        with concurrency.device_slot("cpu", 1, what=f"{name}: ", poll_s=0.02):
            order.append(f"{name} in")
            first_in.set()
            time.sleep(hold)
            order.append(f"{name} out")
    with caplog.at_level(logging.INFO, "gadget_lorein"):
        a = threading.Thread(target=fit, args=("a", 0.3))
        a.start()
        first_in.wait(5)
        b = threading.Thread(target=fit, args=("b", 0.0))
        b.start()
        a.join(5)
        b.join(5)
    assert order == ["a in", "a out", "b in", "b out"]
    assert "b: waiting for a free slot on cpu" in caplog.text and "b: got slot 0" in caplog.text
    with concurrency.device_slot("cpu", 0) as slot:       # no queue
        assert slot is None


def test_gpus_are_named_by_uuid_so_processes_share_one_queue(monkeypatch):
    import types

    import torch
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=f"GPU-uuid-{i}"))
    assert concurrency.device_name(torch.device("cuda")) == "cuda-GPU-uuid-1"
    assert concurrency.device_name(torch.device("cuda", 0)) == "cuda-GPU-uuid-0"
    assert concurrency.device_name(torch.device("cpu")) == "cpu"
