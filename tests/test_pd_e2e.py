"""Progressive distillation end to end on `photos` at 16 px (slow: about 15 minutes on 2 CPU cores).

A `photos`-preset teacher -> PD 16 -> 8 -> 4 -> 2 -> 1 (the preset's rounds) -> domain-feature FD against the
held-out photos of each student and of the teacher's Euler (= DDIM) and DPM-Solver++(2M) at the same NFE, same
reference and sample count (1,000). Checked: PD-1/2/4 beat Euler at their NFE (Salimans & Ho's claim, here on a
16 px teacher of 400 steps), PD-8 is within 5% of Euler-8, and DPM-Solver++(2M) beats Euler at NFE 8.
"""

import json

import pytest

from eval.ref import main as ref_main
from eval.run import main as run_main
from pagoda.__main__ import main
from pagoda.errors import run_cli

pytestmark = pytest.mark.slow


def test_pd_students_beat_euler_at_equal_nfe_on_photos(tmp_path):
    run = lambda *a: run_cli(main, [str(v) for v in a])  # noqa: E731
    assert run("domain", "-o", tmp_path / "w" / "domain-photos.safetensors", "--epochs", "2") == 0
    assert run("teacher", "--preset", "photos", "--out", tmp_path / "t") == 0
    teacher = tmp_path / "t" / "teacher.safetensors"
    assert run("pd", "--preset", "photos", "--teacher", teacher, "--out", tmp_path / "pd") == 0

    common = ["--extractor", "domain", "--weights-dir", str(tmp_path / "w"), "--allow-small", "--num-samples", "1000",
              "--metrics", "fid"]
    ref = tmp_path / "ref.npz"
    assert run_cli(ref_main, ["photos:heldout:16", "-o", str(ref), *common[:5]]) == 0
    out = tmp_path / "fd.jsonl"
    students = [arg for n in (1, 2, 4, 8) for arg in ("--ckpt", str(tmp_path / "pd" / f"pd-{n}" / f"pd-{n}.safetensors"))]
    assert run_cli(run_main, [*students, "--ref", str(ref), "-o", str(out), *common]) == 0
    assert run_cli(run_main, ["--ckpt", str(teacher), "--ref", str(ref), "--sampler", "euler,dpmpp2m", "--steps",
                              "1,2,4,8", "-o", str(out), *common]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    fd = {(r["method"], int(r["nfe"])): r["value"] for r in rows}
    for n in (1, 2, 4):
        assert fd[("pd", n)] < fd[("ddim", n)], (n, fd)
    # At 8 steps Euler on this teacher is near its limit: measured PD-8 11.95 against Euler-8 12.50 (1,000 samples,
    # README); allow 5% so that thread-count rounding cannot flip the test, and check DPM-Solver++ there.
    assert fd[("pd", 8)] < 1.05 * fd[("ddim", 8)], fd
    assert fd[("dpmpp2m", 8)] < fd[("ddim", 8)], fd
