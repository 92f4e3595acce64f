"""`ray job submit` end to end: the README's command runs jobs/train_microvideo.py on a Ray head of its own
(tests/own_ray_head.py: own ports, temp dir and token, stopped by pid), and a re-submission with --resume keeps
every finished stage."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from own_ray_head import BIN, Head

from seater_dist import artifacts

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


def _check_report(out: str) -> dict:
    """report.json as run_pipeline writes it: both models' test metrics, in range and consistent."""
    report = json.loads(artifacts.read_bytes(f"{out}/report.json"))
    assert artifacts.read_bytes(f"{out}/report.md").strip() and artifacts.read_bytes(f"{out}/training.png")
    assert report["test_users"] > 0 and report["counts"]["items"] > 0
    assert report["settings"]["train"]["epochs"] == 1 and report["settings"]["tree"]["k"] == 4
    for model in ("seater", "sasrec"):
        metrics = report[model]
        for k in (20, 50):
            assert 0 <= metrics[f"recall@{k}"] <= metrics[f"hr@{k}"] <= 1, (model, metrics)
            assert 0 <= metrics[f"ndcg@{k}"] <= 1, (model, metrics)
        assert metrics["recall@20"] <= metrics["recall@50"] and metrics["hr@50"] > 0, (model, metrics)
    return report


def _objects(uri: str) -> set[str]:
    """Every object under ``uri``, by path relative to it."""
    fs, root = artifacts.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File}


def _submit_and_succeed(head, name: str, args: str, record_property, timing: str):
    """Submit the job, record how long it took as ``timing``, and assert it SUCCEEDED (else show its log)."""
    t0 = time.time()
    done = _submit(head, name, args)
    record_property(timing, round(time.time() - t0, 1))
    print(f"{name}: {time.time() - t0:.1f} s")
    assert done.returncode == 0 and _succeeded(head, name), (done.stdout + done.stderr)[-6000:]
    return done


@pytest.mark.cluster
def test_ray_job_submit_keeps_every_artifact_in_s3_and_a_resubmission_keeps_the_finished_stages(
        ray_head, ray_session, s3, tmp_path, record_property, capsys):
    """The README's job with --out and --storage in a bucket: every stage reads and writes object storage (synth
    writes the bucket, prepare reads it), the artifacts load back from it, nothing lands on the node's disk but
    Ray's own files, and a re-submission with --resume keeps every stage, the evaluations included. (The checks
    that read the bucket back run on the session's Ray, beside the job's own head.)"""
    from seater_dist.cli import main

    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_text() if address_file.exists() else None
    out, storage = f"{s3}/jobs/{tmp_path.name}/run", f"{s3}/jobs/{tmp_path.name}/ray-train"

    first = _submit_and_succeed(ray_head, "seater-tiny-1", f"--out {out} --storage {storage}", record_property,
                                "first_submit_s")
    report = _check_report(out)
    assert "(--resume)" not in first.stdout
    written = _objects(out)
    for artifact in ("synth/manifest.json", "dataset/manifest.json", "dataset/items.parquet",
                     "sasrec/best/manifest.json", "sasrec/item_embeddings.npy", "sasrec/history.json",
                     "tree/manifest.json", "seater/best/manifest.json", "seater/best/tree/codes.npy",
                     "seater/history.json", "seater/eval_test/metrics.json", "sasrec/eval_test/per_user.parquet",
                     "report.json", "report.md", "training.png"):
        assert artifact in written, artifact
    assert {name.split("/")[0] for name in _objects(storage)} == {"sasrec", "seater"}  # Ray Train's runs, in the bucket
    best = artifacts.read_bytes(f"{out}/seater/best/manifest.json")

    # The upload left .venv, runs/ and .git behind (.gitignore, .rayignore): it stays far below Ray's 100 MiB;
    # and the job wrote nothing into its copy of the working dir (everything went to the bucket).
    packages = [p for p in ray_head.temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert packages and all((p / "jobs" / "train_microvideo.py").is_file() for p in packages)
    for p in packages:
        assert not {".venv", ".git", "runs"} & {c.name for c in p.iterdir()}
        assert sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) < 20 * 2**20
        new = [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
               and not (ROOT / f.relative_to(p)).exists()]  # not uploaded: written by the job
        assert new == [], new

    # What the bucket holds loads back: evaluated again from it, and served from it.
    assert main(["evaluate", "--checkpoint", f"{out}/seater/best", "--data", f"{out}/dataset",
                 "--out", f"{out}/eval-again"]) == 0
    again = json.loads(artifacts.read_bytes(f"{out}/eval-again/metrics.json"))
    assert again["recall@50"] == report["seater"]["recall@50"] and again["ndcg@20"] == report["seater"]["ndcg@20"]
    capsys.readouterr()
    assert main(["recommend", "--checkpoint", f"{out}/seater/best", "--history", "1", "2", "--top-n", "3"]) == 0
    assert "  1. " in capsys.readouterr().out

    second = _submit_and_succeed(ray_head, "seater-tiny-2", f"--out {out} --storage {storage} --resume",
                                 record_property, "resume_submit_s")
    for line in (f"synth: kept {out}/synth", "kept the finished dataset", f"kept the finished run in {out}/sasrec",
                 "kept the finished tree", f"kept the finished run in {out}/seater",
                 f"kept the finished evaluation in {out}/seater/eval_test",
                 f"kept the finished evaluation in {out}/sasrec/eval_test"):
        assert line in second.stdout, second.stdout[-6000:]
    assert artifacts.read_bytes(f"{out}/seater/best/manifest.json") == best  # not trained again
    again = _check_report(out)
    for model in ("seater", "sasrec"):
        assert again[model] == pytest.approx(report[model], abs=1e-6)

    assert (address_file.read_text() if address_file.exists() else None) == before


def test_readme_shows_the_submitted_command():
    """README "From laptop to cluster" shows the command this module submits."""
    assert f"--working-dir . -- {JOB} --out" in (ROOT / "README.md").read_text()
