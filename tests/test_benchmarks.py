"""Smoke tests of the benchmark scripts: they run end to end on a tiny case and print their tables.
(The figures themselves live in benchmarks/RESULTS.md; nothing here is timed.)"""
from __future__ import annotations

import re
import shutil

import pytest
from conftest import REPO, load_script


def load(name):
    return load_script(REPO / "benchmarks" / f"{name}.py")


def test_accuracy_table_with_seeds(capsys):
    acc = load("accuracy")
    acc.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--snr", "30",
              "--methods", "cg", "pmr", "--iterations", "4", "--seeds", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| qalas8 | 30 |") and "lowest" not in line]
    assert len(rows) == 2, out
    assert "realistic simulation" in out.splitlines()[0] and "mean +- sd over seeds 0-1" in out
    # every method runs once per seed (the seed changes the scan): T1, T2 (pure, all, p99) and
    # PD (pure, all) as mean +- sd; qalas has no B1 columns
    for row in rows:
        assert len(re.findall(r"\d\.\d{3} \+- \d\.\d{3}", row)) == 8, row
        assert row.count("| - ") == 3, row
    acc.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--snr", "30",
              "--methods", "pmr", "--iterations", "2", "--seeds", "2", "--first-seed", "3"])
    assert "mean +- sd over seeds 3-4" in capsys.readouterr().out


def test_output_rules_compare_rules_on_the_same_fit(capsys):
    rules = load("output_rules")
    rules.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--iterations", "4",
                "--rules", "lrr", "lrr:0", "lrr:0:0.05", "lrr:0:0.05:0.15", "lrr:0:0.05:0.15:0.05:200", "pmr",
                "pmr:0", "guard:0.7", "--baselines", "zerofill"])
    rows = {line.split("|")[3].strip(): [float(c) for c in line.split("|")[4:10]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| qalas8 | 30 |")}
    assert list(rows) == ["lrr", "lrr:0", "lrr:0:0.05", "lrr:0:0.05:0.15", "lrr:0:0.05:0.15:0.05:200", "pmr",
                          "pmr:0", "guard:0.7", "zerofill"], rows
    assert rows["lrr:0"][1] == rows["pmr:0"][1]         # margin 0: the lower T2 of the same two blocks
    assert rows["lrr:0"][0] == rows["lrr"][0] and rows["pmr:0"][0] == rows["pmr"][0]   # T1 untouched
    assert rows["lrr:0:0.05"][0] == rows["lrr"][0]      # the depth bounds T2 alone; the raise moves T1
    assert rows["zerofill"] not in [rows[r] for r in rows if r != "zerofill"]
    with pytest.raises(ValueError, match="unknown output 'lr'"):
        rules.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--iterations", "2",
                    "--rules", "lr"])


def test_fit_sweep_rows_per_variant_and_baseline(capsys):
    sweep = load("fit_sweep")
    sweep.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--baselines", "zerofill",
                "--variant", "it3=iterations:3", "--variant", "it2=iterations:2"])
    rows = [line.split("|")[3].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| qalas8 | 30 |")]
    assert rows == ["zerofill", "it3", "it2"], rows
    with pytest.raises(SystemExit):
        sweep.main(["--cases", "qalasx"])


def test_accuracy_lowest_row_names_the_lowest_method_of_each_column(capsys):
    acc = load("accuracy")
    acc.main(["--matrix", "12", "12", "8", "--coils", "4", "--cases", "qalas8", "--snr", "30",
              "--seeds", "1", "--methods", "zerofill", "cg"])
    lines = capsys.readouterr().out.splitlines()
    n = len(acc.COLUMNS)
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[4:4 + n]]
            for line in lines if line.startswith("| qalas8 | 30 |")}
    assert list(rows) == ["zerofill", "cg", "lowest"], lines
    for j, cell in enumerate(rows["lowest"]):
        if rows["cg"][j] == "-":
            assert cell == "-"
            continue
        vals = {m: float(rows[m][j]) for m in ("zerofill", "cg")}
        assert cell.split(" = ") == [m for m, v in vals.items() if v == min(vals.values())], (j, rows)
    # values equal to 3 decimals are a tie, naming each; a column no method has is "-"
    row = acc.lowest_row("mrf200 | 30", {"pmr": {"T1 pure": .0504, "B1 pure": .027},
                                         "lorein": {"T1 pure": .0501, "B1 pure": .0272}})
    cells = row.split(" | ")[3:3 + n]
    assert cells[0] == "pmr = lorein" and cells[1] == "-" and cells[8] == "pmr = lorein", row


def test_accuracy_ideal_and_b1_mismatch_are_named_in_the_header(capsys):
    acc = load("accuracy")
    acc.main(["--matrix", "16", "16", "12", "--coils", "4", "--cases", "qalas8", "--seeds", "1",
              "--methods", "cg", "--ideal", "--b1-mismatch"])
    out = capsys.readouterr().out
    assert "ideal simulation" in out.splitlines()[0] and "B1 mismatch" in out.splitlines()[0]
    assert "| qalas8 | ideal | cg |" in out, out
    with pytest.raises(SystemExit):
        acc.main(["--b1-mismatch"])
    assert "--ideal" in capsys.readouterr().err


def test_accuracy_shared_pattern_is_simulated_and_named(capsys, monkeypatch):
    acc = load("accuracy")
    seen = []
    real = acc.simulate.simulate
    monkeypatch.setattr(acc.simulate, "simulate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    acc.main(["--matrix", "16", "16", "12", "--coils", "4", "--cases", "qalas8", "--snr", "30",
              "--seeds", "1", "--methods", "zerofill", "--pattern", "shared"])
    out = capsys.readouterr().out
    assert "shared sampling pattern" in out.splitlines()[0] and "| qalas8 | 30 | zerofill |" in out
    assert seen and seen[0]["pattern"] == "shared" and seen[0]["mode"] == "realistic"
    with pytest.raises(SystemExit):
        acc.main(["--ideal", "--pattern", "shared"])
    assert "realistic" in capsys.readouterr().err


def test_accuracy_cases_defaults_and_bart(capsys):
    acc = load("accuracy")
    a = acc.parse_args([])
    assert a.cases == [("qalas", 8), ("qalas", 16), ("qalas", 48), ("mrf", 200)]
    assert (a.matrix, a.coils, a.seeds, a.snr) == ([40, 32, 24], 6, 3, [15.0, 30.0])
    c = acc.parse_args(["--confirm"])
    assert c.cases == [("qalas", 8), ("mrf", 200)]
    assert (c.matrix, c.coils, c.seeds, c.snr) == ([64, 64, 48], 8, 1, [30.0])
    with pytest.raises(SystemExit):
        acc.parse_args(["--cases", "flash8"])
    capsys.readouterr()
    methods, notes = acc.choose_methods(None)
    assert methods[:len(acc.METHODS)] == acc.METHODS
    methods, notes = acc.choose_methods(["cg", "bart"])
    assert methods == (["cg", "bart"] if shutil.which("bart") else ["cg"]), (methods, notes)


def test_accuracy_settings_reach_the_reconstruction(capsys, monkeypatch):
    acc = load("accuracy")
    seen = []
    real = acc.recon.reconstruct
    monkeypatch.setattr(acc.recon, "reconstruct", lambda scan, st: seen.append(st) or real(scan, st))
    acc.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--snr", "30",
              "--seeds", "1", "--methods", "pmr", "--iterations", "2", "--set", "coil_refine=0",
              "--set", "virtual_coils=2"])
    out = capsys.readouterr().out
    assert [(s.coil_refine, s.virtual_coils, s.method) for s in seen] == [(0, 2, "pmr")]
    assert "coil_refine=0; virtual_coils=2" in out.splitlines()[0], out
    for bad in ("coil_refine", "nonsense=1", "seed=3", "coil_refine=abc"):
        with pytest.raises(SystemExit):
            acc.main(["--set", bad])
        assert "--set" in capsys.readouterr().err


def test_accuracy_peak_memory_is_each_reconstructions_own():
    """The table's CPU peak memory is reset before each reconstruction: a large, freed block
    before it (as the phantom's simulation was) no longer shows in it."""
    import numpy as np
    acc = load("accuracy")
    block = np.ones(300 * 2 ** 20, np.uint8)          # 300 MB, touched
    before = acc.peak_rss_mb()
    del block
    assert acc.reset_peak_rss(), "this Linux kernel lets a process reset its VmHWM"
    after = acc.peak_rss_mb()
    assert after < before - 200, (before, after)


def test_accuracy_rejects_zero_seeds(capsys):
    with pytest.raises(SystemExit):
        load("accuracy").main(["--seeds", "0"])
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_speed_node_path_table(capsys):
    speed = load("speed")
    speed.main(["--matrix", "16", "16", "12", "--coils", "4", "--iterations", "3", "--no-converged",
                "--no-floors", "--in-process"])
    out = capsys.readouterr().out
    for stage in ("buffering", "coil maps", "subspace", "fit", "output"):
        assert stage in out, out


def test_speed_variants_table(capsys, monkeypatch):
    """--variants: a baseline row and one per switch, each with its NRMSE; a bad key is refused."""
    speed = load("speed")
    refine, real_fit = [], speed.lorein.fit
    monkeypatch.setattr(speed.lorein, "fit", lambda *a, config=None, **k:
                        refine.append(config.coil_refine if config else None) or real_fit(*a, config=config, **k))
    speed.main(["--matrix", "16", "16", "12", "--coils", "4", "--iterations", "3", "--no-converged",
                "--no-floors", "--in-process", "--variants", "coil_subset=2,amp=1", "virtual_coils=2",
                "coil_refine=0"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| baseline") or
            line.startswith("| coil_subset=2,amp=1") or line.startswith("| virtual_coils=2") or
            line.startswith("| coil_refine=0")]
    assert len(rows) == 4, out
    assert "| 2 coils" in rows[2], rows
    assert refine[-4:] == [8, 8, 8, 0], refine          # each variant's fit got its coil_refine
    with pytest.raises(SystemExit):
        speed.main(["--variants", "warp=9"])
    assert "KEY=VALUE with KEY one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.main(["--method", "cg", "--variants", "amp=1"])
    assert "--method cg has none" in capsys.readouterr().err



def test_holdout_trace_prints_the_held_out_loss_and_the_maps_at_each_check(capsys):
    load("holdout_trace").main(["--matrix", "12", "12", "8", "--coils", "4", "--sequence", "qalas",
                                "--accel", "4", "--iterations", "40"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == [0, 20, 40], out
    assert "| held pmr | held lrr | T1 brain |" in out and out.splitlines()[-1].startswith("kept: step ")


def test_gpu_accuracy_script_runs_every_case_and_gathers_one_table(tmp_path):
    """benchmarks/gpu_accuracy.sh, as a lent GPU runs it, here on the CPU at a tiny size: one
    accuracy.py process per case, their rows gathered into table.md in the cases' order, and a case
    that fails named without losing the others' rows."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", OUT=str(tmp_path),
               ARGS="--matrix 12 12 8 --coils 4 --methods zerofill cg --iterations 2 --seeds 1 --snr 30",
               CASES="mrf:100000 qalas:8 qalas:4")
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_accuracy.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr     # mrf at R = 100000 has too few lines
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("# accuracy: realistic simulation, matrix [12, 12, 8], 4 coils")
    assert table[1].startswith("| case |")
    rows = [line.split(" | ")[:3] for line in table[3:]]
    assert rows == [["| qalas8", "30", "zerofill"], ["| qalas8", "30", "cg"], ["| qalas8", "30", "lowest"],
                    ["| qalas4", "30", "zerofill"], ["| qalas4", "30", "cg"], ["| qalas4", "30", "lowest"]], table
    assert "case mrf:100000: exit 1" in (tmp_path / "env.txt").read_text()
    assert "accel must be <=" in (tmp_path / "mrf100000.err").read_text()


@pytest.mark.skipif(shutil.which("bart") is None, reason="bart (BART) not on PATH")
def test_accuracy_runs_bart_beside_the_package_methods(capsys):
    acc = load("accuracy")
    acc.main(["--matrix", "16", "16", "12", "--coils", "3", "--cases", "qalas8", "--snr", "30",
              "--seeds", "1", "--methods", "zerofill", "bart"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| qalas8 | 30 | bart |")]
    assert len(row) == 1 and "skipped" not in out.splitlines()[0], out
    t1_pure = float(row[0].split("|")[4])
    assert t1_pure < 0.5, row   # matched maps, not noise


def test_accuracy_skips_bart_with_a_note_when_not_on_path(monkeypatch):
    acc = load("accuracy")
    monkeypatch.setattr(acc.shutil, "which", lambda name: None)
    assert acc.choose_methods(["cg", "bart"]) == (["cg"], ["bart skipped: not on PATH"])
    assert acc.choose_methods(None) == (acc.METHODS, [])


def test_mutation_run_smoke(tmp_path):
    """benchmarks/mutation.py runs on the package as it stands (a few hundred mutated acquisitions):
    every trial ends cleanly, no crash and no hang."""
    import os
    import subprocess
    import sys
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mutation.py"), "--acquisitions", "300"],
                         cwd=REPO, env=dict(os.environ, LOREIN_CACHE_DIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " crash        0" in run.stdout and " hang         0" in run.stdout, run.stdout


def test_confidence_table(capsys):
    conf = load("confidence")
    conf.main(["--matrix", "12", "12", "8", "--coils", "3", "--cases", "qalas8", "--methods", "zerofill"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| qalas8 | zerofill |")]
    assert [r.split("|")[3].strip() for r in rows] == ["T1", "T2"], out
    for row in rows:
        assert re.search(r"\| -?\d\.\d\d \(-?\d\.\d\d\) \| [+-]\d\.\d\d \| \d+\.\d\d \|", row), row


@pytest.mark.gadgetron
def test_throughput_tables(capsys):
    """benchmarks/throughput.py end to end on its smallest case (real servers; about 30 s)."""
    load("throughput").main(["--small", "--volumes", "2", "--scans", "2", "--iterations", "2"])
    out = capsys.readouterr().out
    assert re.search(r"\| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1, 1 \|", out), out
    assert re.search(r"\| device_slots=1 \| [\d.]+ \| [\d.]+ \| [01] \|", out), out
