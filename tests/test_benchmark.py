"""The training-speed benchmark behind scripts/bench.py: a quick real run, and its memory probe."""

from __future__ import annotations

import re

import torch

from conftest import run_script
from xentlit import benchmark


def test_quick_benchmark_reports_every_variant_with_epoch_within_fit_time(tmp_path):
    report = benchmark.run(batch_sizes=(64,), repeats=1, quick=True, out_dir=tmp_path)
    rows = dict(re.findall(r"^\| (A|B|C|D|E|D-no-doctor) \| (.*) \|$", report, flags=re.M))
    assert set(rows) == {"A", "B", "C", "D", "E", "D-no-doctor"}
    for name, cells in rows.items():
        epoch, samples, vs_b, fit = (float(c.replace(",", "")) for c in cells.split(" | "))
        assert 0 < epoch <= fit, name
        assert samples > 0 and vs_b > 0
    assert float(rows["B"].split(" | ")[2]) == 1.0
    assert re.search(r"D/B = [\d.]+, E/B = [\d.]+, A/D = [\d.]+, C/D = [\d.]+", report)


def test_peak_rss_probe_sees_an_allocation_made_after_the_reset():
    before = benchmark._proc_status_mib("VmRSS")
    assert benchmark._reset_peak_rss()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert benchmark._proc_status_mib("VmHWM") - before > 50
    del big


def test_table_loading_benchmark_reports_times_and_memory(tmp_path):
    """A tiny run of scripts/bench_tables.py: the CSV it writes is what it says, and every line of the report comes."""
    import pandas as pd

    result = run_script("bench_tables.py", "--rows", "3000", "--columns", "4", "--repeats", "1",
                        "--workdir", str(tmp_path), cwd=tmp_path, timeout=240)
    frame = pd.read_csv(tmp_path / "table_3000x4.csv")
    assert frame.shape == (3000, 5) and list(frame.columns) == ["f0", "f1", "f2", "f3", "label"]
    assert set(frame["label"]) <= {0, 1, 2, 3}
    for line in ("`FileDataModule.setup()`", "`pandas.read_csv`", "ratio xentlit / pandas", "peak RSS, imports only",
                 "peak RSS, training run (1 epoch)", "(budget 3)"):
        assert line in result.stdout, line
