"""The extraction benchmark's CLI: one row with both rates, their ratio and the FID agreement.

Only the plumbing is checked here (a handful of images); the speed figure itself comes from
`python -m bench.extract --images 2000` run by hand, never asserted in a test.
"""

import pytest

from bench.extract import main as bench_main
from pagoda.errors import run_cli
from pagoda.rows import ROW_KEYS, read_rows


def test_bench_row(inception_weights, tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["--images", "3", "--batch", "2", "--weights-dir", str(inception_weights.parent), "--out", str(out)]
    with pytest.warns(UserWarning):  # 3 samples < 2048 dimensions (and unofficial weights): said, not hidden
        assert run_cli(bench_main, argv) == 0
    (row,) = read_rows(out)
    assert set(ROW_KEYS) <= set(row) and row["metric"] == "extract_speedup"
    assert row["device"].endswith("threads)")  # the CPU's model and thread count
    extra = row["extra"]
    assert row["value"] == pytest.approx(extra["img_per_s_ours"] / extra["img_per_s_torch_fidelity"], rel=1e-2)
    assert extra["max_rel_feature_err"] < 1e-3 and extra["fid_ours"] > 0
    assert extra["abs_delta_fid"] <= 1e-3 * extra["fid_torch_fidelity"]
    assert extra["sfid"] is True and extra["img_per_s_ours_fid_only"] > 0 and "sfid_extra_cost" in extra
    assert row["num_samples"] == 6 and "ratio" in capsys.readouterr().out


def test_bench_folder_rows(inception_weights, tmp_path, capsys):
    """--folder: one img/s row per tool (pagoda without / with a cold / warm cache, torch-fidelity, clean-fid) and
    the re-score speed-up, whose warm run extracted nothing (run_folder asserts it)."""
    out = tmp_path / "bench.jsonl"
    argv = ["--folder", "--images", "4", "--batch", "2", "--weights-dir", str(inception_weights.parent), "-o", str(out)]
    with pytest.warns(UserWarning):
        assert run_cli(bench_main, argv) == 0
    rows = read_rows(out)
    tools = [r["extra"]["tool"] for r in rows if r["metric"] == "extract_img_per_s"]
    assert tools == ["pagoda_no_cache", "pagoda_cold", "pagoda_warm", "torch_fidelity", "clean_fid"]
    assert all(r["value"] > 0 and r["num_samples"] == 4 for r in rows)
    (rescore,) = [r for r in rows if r["metric"] == "rescore_speedup"]
    assert rescore["extra"]["same_stats"] is True and "read + decode" in capsys.readouterr().out


def test_bench_bad_arguments(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert run_cli(bench_main, ["--images", "1", "--out", str(out)]) == 2
    assert run_cli(bench_main, ["--images", "100000", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err) and not out.exists()
