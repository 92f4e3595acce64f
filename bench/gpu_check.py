"""`make gpu-check` (`python -m bench.gpu_check`): the GPU path end to end, for whoever has a GPU.

    python -m bench.gpu_check                 # "no GPU: skipped" (exit 0) on a machine without CUDA
    python -m bench.gpu_check --out runs/gpu  # keep both runs' artifacts

On a machine with one or more GPUs: `seater run` on the tiny preset of jobs/train_microvideo.py (synthetic data,
seed 0, one training worker, 2 epochs per model), once on the CPU and once with ``use_gpu: true`` for SASRec,
SEATER and the evaluation; then

* asserts the GPU was used: every epoch's ``gpu_peak_bytes`` (torch.cuda.max_memory_allocated in the training
  worker) is above 0 for both models, and both evaluations report they ranked on ``cuda``;
* ranks the CPU run's checkpoints again on the GPU: each test metric within SCORING_TOLERANCE of the CPU's (only
  float rounding differs, which can swap near-tied items at a cut-off for a few users);
* compares the GPU-trained models with the CPU-trained ones (same seed, same data order, different float
  rounding from step 1 on): each test metric within TRAINED_TOLERANCE;
* prints each model's step time and samples/s on GPU and CPU.

Exit code 0 when every check passes, 1 otherwise (the failed checks are printed). About 3 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

SCORING_TOLERANCE = 0.01  # same checkpoint, GPU vs CPU ranking: |difference| of a test metric (absolute)
TRAINED_TOLERANCE = 0.05  # GPU- vs CPU-trained, same seed: |difference| of a test metric (absolute)
METRICS = ("recall@50", "ndcg@50", "recall@20")
MODELS = ("sasrec", "seater")
EPOCHS = 2


def settings(use_gpu: bool) -> Any:
    """The tiny preset's settings, one worker and EPOCHS epochs per model, everything on the GPU or the CPU."""
    from jobs.train_microvideo import PRESETS
    from seater_dist.config import RunSettings

    run = json.loads(json.dumps(PRESETS["tiny"]["run"]))
    for stage in ("sasrec_train", "train"):
        run[stage].update(workers=1, epochs=EPOCHS, use_gpu=use_gpu)
    run["eval"].update(use_gpu=use_gpu, concurrency=1)
    return RunSettings.model_validate(run)


def run_once(synth: Path, out: Path, use_gpu: bool) -> dict[str, Any]:
    """One `seater run` -> {model: {"metrics", "history", "devices"}}."""
    from seater_dist.pipeline import run_pipeline

    run_pipeline(str(synth), "interactions", "comirec", out, settings(use_gpu), progress=lambda _: None)
    result = {}
    for model in MODELS:
        evaluation = json.loads((out / model / "eval_test" / "metrics.json").read_text())
        result[model] = {"metrics": evaluation, "devices": evaluation["devices"],
                         "history": json.loads((out / model / "history.json").read_text())}
    return result


def rescore_on_gpu(out: Path) -> dict[str, dict[str, float]]:
    """The CPU run's best checkpoints ranked again by GPU evaluation actors -> {model: metrics}."""
    from seater_dist.config import EvalSettings
    from seater_dist.eval.offline import evaluate

    gpu = EvalSettings(use_gpu=True, concurrency=1)
    return {model: evaluate(out / model / "best", out / "dataset", "test", gpu,
                            out=out / model / "eval_test_gpu").metrics
            for model in MODELS}


def checks(cpu: dict[str, Any], gpu: dict[str, Any], rescored: dict[str, dict[str, float]]) -> list[str]:
    """Every failed check, as a line (empty: all passed)."""
    failed = []
    for model in MODELS:
        peaks = [r["gpu_peak_bytes"] for r in gpu[model]["history"]]
        if not all(p > 0 for p in peaks):
            failed.append(f"{model}: training did not allocate GPU memory (gpu_peak_bytes per epoch {peaks})")
        if not all(d.startswith("cuda") for d in gpu[model]["devices"]):
            failed.append(f"{model}: the GPU evaluation ranked on {gpu[model]['devices']}")
        for name in METRICS:
            ref = cpu[model]["metrics"][name]
            if abs(rescored[model][name] - ref) > SCORING_TOLERANCE:
                failed.append(f"{model} {name}: CPU checkpoint ranked on GPU {rescored[model][name]:.4f} vs CPU "
                              f"{ref:.4f} (tolerance {SCORING_TOLERANCE})")
            if abs(gpu[model]["metrics"][name] - ref) > TRAINED_TOLERANCE:
                failed.append(f"{model} {name}: GPU-trained {gpu[model]['metrics'][name]:.4f} vs CPU-trained "
                              f"{ref:.4f} (tolerance {TRAINED_TOLERANCE})")
    return failed


def report(cpu: dict[str, Any], gpu: dict[str, Any]) -> None:
    """Step time and samples/s of the last epoch (the first one warms up), GPU vs CPU, and the test metrics."""
    print(f"{'model':8} {'device':6} {'step ms':>9} {'samples/s':>11} {'GPU peak MB':>12} "
          + " ".join(f"{m:>10}" for m in METRICS))
    for model in MODELS:
        speeds = {}
        for device, run in (("cpu", cpu), ("cuda", gpu)):
            last = run[model]["history"][-1]
            speeds[device] = last["samples_per_second"]
            step_ms = 1000 * last["train_seconds"] / max(last["steps"], 1)
            print(f"{model:8} {device:6} {step_ms:9.1f} {last['samples_per_second']:11,.0f} "
                  f"{last.get('gpu_peak_bytes', 0) / 2**20:12.1f} "
                  + " ".join(f"{run[model]['metrics'][m]:10.4f}" for m in METRICS))
        print(f"{model:8} GPU/CPU samples/s: {speeds['cuda'] / max(speeds['cpu'], 1e-9):.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where both runs go (default: a temporary directory, removed at the end)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return 0
    from seater_dist.config import SynthSettings
    from seater_dist.data.synth import synthesize
    from seater_dist.runtime.ray_env import init_ray

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(args.out or tmp)
        print(f"GPU check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible), "
              f"tiny preset, seed 0, 1 worker, {EPOCHS} epochs per model -> {root}", flush=True)
        init_ray()
        synthesize(SynthSettings(preset="tiny", out=str(root / "synth"), seed=0))
        cpu = run_once(root / "synth", root / "cpu", use_gpu=False)
        gpu = run_once(root / "synth", root / "gpu", use_gpu=True)
        rescored = rescore_on_gpu(root / "cpu")
        report(cpu, gpu)
        failed = checks(cpu, gpu, rescored)
    for line in failed:
        print(f"FAILED: {line}")
    print("GPU check: " + ("failed" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
