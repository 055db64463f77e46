"""eval.gate: pass, regression with a diff table, malformed input; tolerance parsing and directions."""

import json

import pytest

from eval.gate import main, parse_tolerances
from eval.rows import make_row
from pagoda.errors import UserError, run_cli
from pagoda.rows import append_rows, read_rows


def _rows(fid, is_, precision=0.7, std=0.5):
    cell = dict(method="pagoda", resolution=16, guidance=1.0, sampler=None, steps=None, num_samples=100)
    return [make_row(model="g16", metric="fid", value=fid, **cell),
            make_row(model="g16", metric="is", value=is_, extra={"style": "adm", "std": std}, **cell),
            make_row(model="g16", metric="precision", value=precision, **cell)]


@pytest.fixture
def files(tmp_path):
    base = tmp_path / "base.jsonl"
    append_rows(base, _rows(10.0, 50.0))
    return base, tmp_path / "new.jsonl"


def test_parse_tolerances():
    t = parse_tolerances("fid=+0.05,is=-1%,kid=0.001")
    assert t["fid"].direction == 1 and t["fid"].amount == 0.05 and not t["fid"].relative
    assert t["is"].direction == -1 and t["is"].relative and t["is"].bound(50.0) == pytest.approx(49.5)
    assert t["kid"].direction == 1  # sign taken from the metric's known direction
    for bad in ("fid", "fid=abc", "fid=+1%%", "mystery=0.1", "fid=+1e999", "fid=+1e400", "fid=+5,fid=+6"):
        with pytest.raises(UserError):
            parse_tolerances(bad)


def test_pass_within_tolerance(files, capsys):
    base, new = files
    append_rows(new, _rows(10.04, 49.6, precision=0.75, std=0.7))  # worse but inside; precision better
    assert run_cli(main, ["--results", str(new), "--baseline", str(base), "--tolerance", "fid=+0.05,is=-1%"]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION" not in out and "gate: pass" in out


def test_regression_exit_1_with_table(files, capsys):
    base, new = files
    append_rows(new, _rows(10.2, 49.6))
    code = run_cli(main, ["--results", str(new), "--baseline", str(base), "--tolerance", "fid=+0.05,is=-1%"])
    assert code == 1
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if " fid " in f" {s} ")
    assert "REGRESSION" in line and "10.2" in line and "10.05" in line  # new value and allowed bound
    assert "baseline" in out.splitlines()[0] and "delta" in out.splitlines()[0]


def test_relative_tolerance_fails_below(files):
    base, new = files
    append_rows(new, _rows(10.0, 49.4))  # IS fell by 1.2% > 1%
    assert run_cli(main, ["--results", str(new), "--baseline", str(base), "--tolerance", "is=-1%"]) == 1


def test_missing_row(files, capsys):
    base, new = files
    append_rows(new, _rows(10.0, 50.0)[:2])  # precision row absent
    args = ["--results", str(new), "--baseline", str(base)]
    assert run_cli(main, args) == 1 and "MISSING" in capsys.readouterr().out
    assert run_cli(main, args + ["--allow-missing"]) == 0


def test_appended_runs_are_noted_and_rows_told_apart(files, capsys):
    """A file holding two runs of one setting is gated on the last, and says so; rows that differ only in `extra`
    (a --repeat range, the selection) show a setting column."""
    base, new = files
    append_rows(new, _rows(99.0, 50.0) + _rows(10.0, 50.0))
    assert run_cli(main, ["--results", str(new), "--baseline", str(base)]) == 0
    assert "note: --results holds 3 row(s) measured again by a later row" in capsys.readouterr().err
    rep = [dict(r, extra=dict(r["extra"], repeat=k)) for k in (0, 1) for r in _rows(10.0, 50.0)]
    (base.parent / "rep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rep))
    assert run_cli(main, ["--results", str(base.parent / "rep.jsonl"), "--baseline", str(base.parent / "rep.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "setting" in out.splitlines()[0] and "repeat=0" in out and "repeat=1" in out


def test_nan_is_regression(files):
    base, new = files
    append_rows(new, _rows(float("nan"), 50.0))
    assert run_cli(main, ["--results", str(new), "--baseline", str(base), "--tolerance", "fid=+100"]) == 1


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_baseline_refused(tmp_path, capsys, value):
    """An inf baseline used to let every result pass and a NaN one to fail them all: both are refused (exit 2,
    one line naming the row), and --write-baseline never writes one."""
    base, new = tmp_path / "base.jsonl", tmp_path / "new.jsonl"
    append_rows(base, _rows(value, 50.0))
    append_rows(new, _rows(1e6, 50.0))
    assert run_cli(main, ["--results", str(new), "--baseline", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fid row of g16 at 16 px" in err and "no baseline" in err
    # Filtered to another metric, the failed fid row is not compared, so it is not refused.
    assert run_cli(main, ["--results", str(new), "--baseline", str(base), "--metrics", "is"]) == 0
    assert run_cli(main, ["--results", str(new), "--baseline", str(base), "--metrics", ","]) == 2
    assert "names no metric" in capsys.readouterr().err
    out = tmp_path / "written.jsonl"
    assert run_cli(main, ["--results", str(base), "--write-baseline", str(out)]) == 2 and not out.exists()


@pytest.mark.parametrize("case", ["bad_json", "bad_tol", "absent_metric", "no_value"])
def test_malformed_exit_2(files, capsys, case):
    base, new = files
    append_rows(new, _rows(10.0, 50.0))
    tol = {"bad_tol": "fid=+x", "absent_metric": "fdd=+1"}.get(case, "fid=+0.05")
    if case == "bad_json":
        new.write_text(new.read_text() + "{not json\n")
    if case == "no_value":
        new.write_text(new.read_text() + json.dumps({"model": "g16", "metric": "fid"}) + "\n")
    assert run_cli(main, ["--results", str(new), "--baseline", str(base), "--tolerance", tol]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if case in ("bad_json", "no_value"):
        assert f"{new}:4" in err[0]  # file and line number named


def test_append_is_whole_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(make_row(model="m", metric="fid", value=1.0)))  # no trailing newline
    append_rows(path, _rows(1.0, 2.0))
    rows = read_rows(path)
    assert len(rows) == 4 and all(set(r) >= {"model", "metric", "value", "extra"} for r in rows)
    assert not list(tmp_path.glob(".*tmp"))


def test_empty_results_are_bad_input_not_a_table_of_missing_rows(files, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base, _ = files
    assert run_cli(main, ["--results", str(empty), "--baseline", str(base)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no rows" in err[0]


def test_write_baseline_never_replaces_another_file(files, tmp_path, capsys):
    base, _ = files
    other = tmp_path / "ref.npz"
    other.write_bytes(b"PK\x03\x04 not rows")
    assert run_cli(main, ["--results", str(base), "--write-baseline", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose another file" in err[0]
    assert other.read_bytes() == b"PK\x03\x04 not rows"
    old = tmp_path / "old.jsonl"  # a baseline of rows is replaced, as before
    append_rows(old, _rows(1.0, 2.0))
    assert run_cli(main, ["--results", str(base), "--write-baseline", str(old)]) == 0
    assert [r["value"] for r in read_rows(old)] == [r["value"] for r in read_rows(base)]
