r"""Ray Job: the whole SEATER pipeline at Micro-Video scale (or a laptop-sized rehearsal).

    ray job submit --working-dir . -- python jobs/train_microvideo.py --preset local
    ray job submit --working-dir . -- python jobs/train_microvideo.py --preset microvideo \
        --out /mnt/shared/seater/microvideo --storage s3://my-bucket/seater/ray-train

Stages, as `seater run`: synth (the paper's industrial shape: 0.75M users, 6.1M items, 85M interactions)
-> prepare -> embed (SASRec) -> build-tree -> train (SEATER) -> evaluate -> report.

Flags: `--preset` (microvideo or local), `--out` (every stage's artifact; storage every node sees: NFS or
a mounted bucket), `--storage` (Ray Train's checkpoint storage, any pyarrow.fs URI), `--resume`
(re-submitted: keep the stages that finished under --out, continue an interrupted training run from
its last epoch), `--address` (default: the cluster the job was submitted to).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not pip-installed

from seater_dist.config import RunSettings, SynthSettings  # noqa: E402

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
            "eval": {"batch_size": 1024},
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
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="local",
                   help="microvideo: the paper's industrial shape on a GPU cluster; local: the same on 2 CPUs")
    p.add_argument("--out", default="runs/job", help="shared directory for every stage's artifact")
    p.add_argument("--storage", help="Ray Train storage path or URI (default: OUT/<stage>/ray_results)")
    p.add_argument("--resume", action="store_true",
                   help="keep the stages that finished under --out; continue an interrupted training run")
    p.add_argument("--address", default=None, help="Ray address (default: the cluster the job was submitted to)")
    args = p.parse_args(argv)

    from seater_dist.data.synth import synthesize
    from seater_dist.pipeline import run_pipeline
    from seater_dist.ray_env import init_ray

    init_ray(args.address)  # RAY_ADDRESS is set by `ray job submit`; else a local Ray
    if not os.environ.get("SEATER_VERBOSE"):
        from seater_dist.errors import hide_duplicate_error_reports

        hide_duplicate_error_reports()
    preset = PRESETS[args.preset]
    run = preset["run"]
    if args.storage:
        storage = args.storage.rstrip("/")
        run = {**run, "train": {**run.get("train", {}), "storage_path": f"{storage}/seater"},
               "sasrec_train": {**run.get("sasrec_train", {}), "storage_path": f"{storage}/sasrec"}}
    settings = RunSettings.model_validate(run)
    out = Path(args.out)
    synth_dir = out / "synth"
    if args.resume and (synth_dir / "manifest.json").exists():
        print(f"synth: kept {synth_dir} (--resume)", flush=True)
    else:
        print(f"synth: preset {preset['synth']} -> {synth_dir}", flush=True)
        synthesize(SynthSettings(preset=preset["synth"], out=str(synth_dir)))
    run_pipeline(str(synth_dir), "interactions", "comirec", out, settings, resume=args.resume)
    return 0


def run(argv: list[str] | None = None) -> int:
    """:func:`main` with the CLI's one error path: any failure as one line (traceback with SEATER_VERBOSE=1)."""
    from seater_dist.errors import EXIT_INTERRUPTED, describe

    try:
        return main(argv)
    except (Exception, KeyboardInterrupt) as err:
        message, code = describe(err)
        if os.environ.get("SEATER_VERBOSE"):
            traceback.print_exception(err)
        if code == EXIT_INTERRUPTED:
            message = "interrupted; re-submit with --resume to keep the finished stages and epochs"
        print(f"train_microvideo: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(run())
