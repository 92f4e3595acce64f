r"""Ray Job: the whole SEATER pipeline at Micro-Video scale (or a laptop-sized rehearsal).

    ray job submit --working-dir . -- python jobs/train_microvideo.py --preset tiny --out /tmp/seater-job
    ray job submit --working-dir . -- python jobs/train_microvideo.py --preset microvideo \
        --out s3://my-bucket/seater/microvideo --storage s3://my-bucket/seater/ray-train

Stages, as `seater run`: synth (the paper's industrial shape: 0.75M users, 6.1M items, 85M interactions)
-> prepare -> embed (SASRec) -> build-tree -> train (SEATER) -> evaluate -> report.

Flags:
  --preset    microvideo (the paper's shape, 8 GPU workers), local (the tiny synthetic data at full widths, up
              to 5 epochs per model: about 3 minutes on 2 CPUs) or tiny (CI: the same data at small widths, one
              epoch per model; tests/test_ray_job_submit.py submits it and re-submits it with --resume in about
              2 minutes on 2 CPUs).
  --out       every stage's artifact (OUT/synth, OUT/dataset, OUT/sasrec, OUT/tree, OUT/seater) and the report
              (OUT/report.json, OUT/report.md, OUT/training.png). On a cluster: storage every node sees, an
              object storage URI (s3://bucket/run; credentials from the environment: AWS_ENDPOINT_URL,
              AWS_REGION, AWS_ACCESS_KEY_ID, ...) or a shared mount (NFS). Inside a submitted job a relative
              path is refused: it would land in the job's temporary copy of the working dir.
  --storage   Ray Train's run storage (every reported checkpoint; what --resume continues from), a path or any
              pyarrow.fs URI; each model gets STORAGE/sasrec and STORAGE/seater. Default: OUT/sasrec/ray_results
              and OUT/seater/ray_results.
  --resume    re-submitted: keep every stage that finished under --out (printed as "kept ..."), continue an
              interrupted training run from its last epoch (from --storage: give the same one), then
              evaluate and write the report again.
  --address   the Ray cluster (default: the cluster the job was submitted to, through RAY_ADDRESS; run
              directly, a private local Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from seater_dist.artifacts import is_remote, local_path  # noqa: E402
from seater_dist.config import RunSettings, SettingsError, SynthSettings  # noqa: E402
from seater_dist.runtime.quiet import verbose  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's industrial setting on a GPU cluster: k = 16 (depth 6 for 6.1M items), batch 2048.
    "microvideo": {
        "synth": "microvideo",
        "run": {
            "tree": {"k": 16},
            "sasrec": {"loss": "sampled", "num_negatives": 1280},
            "sasrec_train": {"workers": 8, "use_gpu": True, "cpus_per_worker": 8, "batch_size": 2048,
                             "epochs": 20, "max_valid_users": 20000},
            "train": {"workers": 8, "use_gpu": True, "cpus_per_worker": 8, "batch_size": 2048, "epochs": 50,
                      "max_valid_users": 20000},
            "eval": {"batch_size": 1024, "use_gpu": True, "concurrency": 8, "cpus_per_actor": 4},
        },
    },
    # The same stages sized for a 2-CPU machine (minutes, not hours).
    "local": {
        "synth": "tiny",
        "run": {
            "tree": {"k": 8},
            "sasrec_train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": 5, "patience": 2},
            "train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": 5, "patience": 2},
        },
    },
    # CI's `ray job submit` run: every stage once, both models for one epoch on small widths (about a minute).
    "tiny": {
        "synth": "tiny",
        "run": {
            "tree": {"k": 4, "n_init": 1, "quality_sample_nodes": 0},
            "sasrec": {"d_model": 16, "num_blocks": 1, "num_negatives": 64},
            "seater": {"d_model": 16, "ffn_dim": 32, "beam_size": 20},
            "sasrec_train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "batch_size": 128},
            "train": {"workers": 2, "cpus_per_worker": 0.5, "epochs": 1, "batch_size": 128},
            "eval": {"concurrency": 1},
        },
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The job's command line (the flags of the module docstring)."""
    p = argparse.ArgumentParser(prog="train_microvideo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="local",
                   help="microvideo: the paper's industrial shape on a GPU cluster; local: the same on 2 CPUs; "
                        "tiny: CI's one-epoch run")
    p.add_argument("--out", default="runs/job",
                   help="every stage's artifact and the report (on a cluster: storage every node sees)")
    p.add_argument("--storage", help="Ray Train storage path or URI (default: OUT/<model>/ray_results)")
    p.add_argument("--resume", action="store_true",
                   help="keep the stages that finished under --out; continue an interrupted training run")
    p.add_argument("--address", default=None, help="Ray address (default: the cluster the job was submitted to)")
    return p


def run_settings(preset: str, storage: str | None = None) -> RunSettings:
    """The preset's settings for every stage; ``storage``: Ray Train's storage, STORAGE/sasrec and STORAGE/seater."""
    run = PRESETS[preset]["run"]
    if storage:
        storage = storage.rstrip("/")
        run = {**run, "train": {**run.get("train", {}), "storage_path": f"{storage}/seater"},
               "sasrec_train": {**run.get("sasrec_train", {}), "storage_path": f"{storage}/sasrec"}}
    return RunSettings.model_validate(run)


def check_out(out: str, submitted: bool | None = None) -> str:
    """``--out``, checked: a URI (``s3://bucket/run``) or a path; a relative path is refused in a submitted job
    (``submitted``, default: whether this process is one): it would land in the job's temporary copy of the
    working dir, seen by no other node and gone with the job."""
    if submitted is None:
        submitted = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))  # set by Ray's job supervisor
    if submitted and not is_remote(out) and not local_path(out).is_absolute():
        raise SettingsError(f"--out: {out} is relative, and a submitted job runs in a temporary copy of its working "
                            "dir; give an absolute path every node sees or a URI, e.g. s3://bucket/seater/run")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = check_out(args.out)
    settings = run_settings(args.preset, args.storage)  # a bad setting fails here, before Ray starts

    from seater_dist import artifacts
    from seater_dist.pipeline import run_demands, run_pipeline
    from seater_dist.runtime import capacity
    from seater_dist.runtime.ray_env import init_ray

    init_ray(args.address)  # RAY_ADDRESS is set by `ray job submit`; else a local Ray
    capacity.require(run_demands(settings))  # before synth: a GPU preset on a CPU cluster fails now, not in train
    if not verbose():
        from seater_dist.runtime.errors import hide_duplicate_error_reports

        hide_duplicate_error_reports()
    # A local --out is held from the synth on (run_pipeline re-enters the lock); a URI has no lock.
    with artifacts.writer_lock(out, inside=True):
        synth_dir = _synth(args.preset, artifacts.join(out, "synth"), args.resume)
        run_pipeline(synth_dir, "interactions", "comirec", out, settings, resume=args.resume)
    return 0


def _synth(preset: str, synth_dir: str, resume: bool) -> str:
    """The preset's synthetic logs at ``synth_dir`` (a path or URI): kept on ``resume`` if they are there."""
    from seater_dist import artifacts
    from seater_dist.data.synth import synthesize

    synth = PRESETS[preset]["synth"]
    manifest = artifacts.join(synth_dir, "manifest.json")
    if resume and artifacts.exists(manifest):
        kept = json.loads(artifacts.read_bytes(manifest)).get("preset")
        if kept != synth:
            raise SettingsError(f"--resume: {synth_dir} holds the synth preset {kept}, not {synth} "
                                f"(--preset {preset}); give another --out or drop --resume")
        print(f"synth: kept {synth_dir} (--resume)", flush=True)
        return synth_dir
    print(f"synth: preset {synth} -> {synth_dir}", flush=True)
    with artifacts.staged_output(synth_dir) as local:  # a URI: written locally, then published whole
        synthesize(SynthSettings(preset=synth, out=str(local)))
    return synth_dir


def run(argv: list[str] | None = None) -> int:
    """:func:`main` with the CLI's one error path: any failure as one line (traceback with SEATER_VERBOSE=1)."""
    from seater_dist.runtime.errors import EXIT_INTERRUPTED, describe

    try:
        return main(argv)
    except (Exception, KeyboardInterrupt) as err:
        message, code = describe(err)
        if verbose():
            traceback.print_exception(err)
        if code == EXIT_INTERRUPTED:
            message = "interrupted; re-submit with --resume to keep the finished stages and epochs"
        print(f"train_microvideo: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(run())
