"""`ray job submit` end to end: the README's command runs jobs/train_microvideo.py on a Ray head of its own
(tests/own_ray_head.py: own ports, temp dir and token, stopped by pid), and a re-submission with --resume keeps
every finished stage."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from own_ray_head import BIN, Head

ROOT = Path(__file__).resolve().parents[1]
JOB = "python jobs/train_microvideo.py --preset tiny"  # as in README "From laptop to cluster"
SUBMIT_TIMEOUT_S = 600  # per submission


def _submit(head: Head, submission_id: str, args: str) -> subprocess.CompletedProcess:
    """The README's `ray job submit`, waited for (bounded); its output is the job's log."""
    cmd = (f"{BIN / 'ray'} job submit --address {head.dashboard} --submission-id {submission_id} "
           f"--working-dir . -- {JOB} {args}")
    return subprocess.run(cmd, shell=True, cwd=ROOT, env=head.env, capture_output=True, text=True,
                          timeout=SUBMIT_TIMEOUT_S)


def _succeeded(head: Head, submission_id: str) -> bool:
    """Whether `ray job status` reports the job as succeeded."""
    out = subprocess.run([str(BIN / "ray"), "job", "status", "--address", head.dashboard, submission_id],
                         env=head.env, capture_output=True, text=True, timeout=60).stdout
    return f"Job '{submission_id}' succeeded" in out


def _check_report(out: Path) -> dict:
    """report.json as run_pipeline writes it: both models' test metrics, in range and consistent."""
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().strip() and (out / "training.png").stat().st_size > 0
    assert report["test_users"] > 0 and report["counts"]["items"] > 0
    assert report["settings"]["train"]["epochs"] == 1 and report["settings"]["tree"]["k"] == 4
    for model in ("seater", "sasrec"):
        metrics = report[model]
        for k in (20, 50):
            assert 0 <= metrics[f"recall@{k}"] <= metrics[f"hr@{k}"] <= 1, (model, metrics)
            assert 0 <= metrics[f"ndcg@{k}"] <= 1, (model, metrics)
        assert metrics["recall@20"] <= metrics["recall@50"] and metrics["hr@50"] > 0, (model, metrics)
    return report


def _submit_and_succeed(head, name: str, args: str, record_property, timing: str):
    """Submit the job, record how long it took as ``timing``, and assert it SUCCEEDED (else show its log)."""
    t0 = time.time()
    done = _submit(head, name, args)
    record_property(timing, round(time.time() - t0, 1))
    print(f"{name}: {time.time() - t0:.1f} s")
    assert done.returncode == 0 and _succeeded(head, name), (done.stdout + done.stderr)[-6000:]
    return done


@pytest.mark.cluster
def test_ray_job_submit_runs_the_pipeline_and_a_resubmission_keeps_the_finished_stages(ray_head, tmp_path,
                                                                                          record_property):
    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_text() if address_file.exists() else None
    out = tmp_path / "job"

    first = _submit_and_succeed(ray_head, "seater-tiny-1", f"--out {out}", record_property, "first_submit_s")
    report = _check_report(out)
    assert "(--resume)" not in first.stdout
    best = out / "seater" / "best" / "manifest.json"
    best_bytes = best.read_bytes()

    # The upload left .venv, runs/ and .git behind (.gitignore, .rayignore): it stays far below Ray's 100 MiB.
    packages = [p for p in ray_head.temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert packages and all((p / "jobs" / "train_microvideo.py").is_file() for p in packages)
    for p in packages:
        assert not {".venv", ".git", "runs"} & {c.name for c in p.iterdir()}
        assert sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) < 20 * 2**20

    second = _submit_and_succeed(ray_head, "seater-tiny-2", f"--out {out} --resume", record_property,
                                 "resume_submit_s")
    for line in (f"synth: kept {out / 'synth'}", "kept the finished dataset",
                 f"kept the finished run in {out / 'sasrec'}", "kept the finished tree",
                 f"kept the finished run in {out / 'seater'}", f"kept the finished evaluation in {out / 'seater'}",
                 f"kept the finished evaluation in {out / 'sasrec'}"):
        assert line in second.stdout, second.stdout[-6000:]
    assert best.read_bytes() == best_bytes  # not trained again
    again = _check_report(out)
    for model in ("seater", "sasrec"):
        assert again[model] == pytest.approx(report[model], abs=1e-6)

    assert (address_file.read_text() if address_file.exists() else None) == before


def test_readme_shows_the_submitted_command():
    """README "From laptop to cluster" shows the command this module submits."""
    assert f"--working-dir . -- {JOB} --out" in (ROOT / "README.md").read_text()
