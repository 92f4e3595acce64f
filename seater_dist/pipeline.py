"""`seater run` and `seater demo`: every stage in order, each leaving its artifact under ``out``:

    out/dataset/   prepare      (Ray Data)
    out/sasrec/    embed        (Ray Train: SASRec; item_embeddings.npy feeds the tree; the baseline)
    out/tree/      build-tree   (Ray tasks, level by level)
    out/seater/    train        (Ray Train DDP: SEATER)
    out/report.json, out/report.md, out/training.png   evaluate both on the same test users, compare

Also the CLI handlers of the training and evaluation commands (imported lazily by cli.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from seater_dist.config import PrepareSettings, RunSettings, SynthSettings

DEMO_CONFIG: dict[str, Any] = {
    # Sized for a 2-core laptop: the whole demo (synth, prepare, SASRec, tree, SEATER, evaluation)
    # in under 10 minutes. Every other setting is the paper's default.
    "tree": {"k": 8},
    "sasrec": {"num_negatives": 256},  # 2,500 items: 256 shared negatives suffice
    "sasrec_train": {"epochs": 8, "batch_size": 256, "patience": 3},
    "train": {"epochs": 5, "batch_size": 256, "patience": 3},
}


def _ks(protocol: str) -> tuple[int, ...]:
    return (5, 10, 20, 50) if protocol == "loo" else (20, 50)


def _stage(i: int, n: int, text: str) -> float:
    print(f"[{i}/{n}] {text}", flush=True)
    return time.time()


def run_pipeline(input_path: str, fmt: str, protocol: str, out: str | Path, settings: RunSettings,
                 workers: int | None = None) -> dict[str, Any]:
    """prepare -> embed -> build-tree -> train -> evaluate both; returns (and writes) the report."""
    from seater_dist.data.prepare import prepare
    from seater_dist.eval.offline import evaluate
    from seater_dist.train.trainer import train_sasrec, train_seater
    from seater_dist.tree.builder import build_tree

    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if workers:
        settings.train.workers = settings.sasrec_train.workers = workers
    ks = _ks(protocol)
    seconds: dict[str, float] = {}
    n = 5

    t = _stage(1, n, f"prepare {input_path} ({fmt}, protocol {protocol})")
    prep = PrepareSettings.model_validate({"input": str(input_path), "format": fmt, "protocol": protocol,
                                           "out": str(out / "dataset"), **settings.prepare})
    manifest = prepare(prep)
    seconds["prepare"] = time.time() - t
    counts = manifest.get("counts", manifest)
    print(f"      {counts.get('users', '?'):,} users, {counts.get('items', '?'):,} items, "
          f"{counts.get('interactions', '?'):,} interactions", flush=True)

    t = _stage(2, n, f"embed: SASRec ({settings.sasrec.loss} loss) on {settings.sasrec_train.workers} worker(s)")
    sasrec = train_sasrec(out / "dataset", out / "sasrec", settings.sasrec_train, settings.sasrec, ks=ks)
    seconds["embed"] = time.time() - t
    _print_epochs("SASRec", sasrec.history, settings.sasrec_train.select_metric)

    t = _stage(3, n, f"build-tree: k = {settings.tree.k}")
    embeddings = np.load(out / "sasrec" / "item_embeddings.npy")
    tree = build_tree(embeddings, settings.tree.k, settings=settings.tree)
    tree.save(out / "tree")
    seconds["build_tree"] = time.time() - t
    print(f"      {tree.num_items:,} items, depth {tree.depth}, {tree.num_internal:,} internal nodes", flush=True)

    t = _stage(4, n, f"train: SEATER on {settings.train.workers} worker(s)")
    seater = train_seater(out / "dataset", out / "tree", out / "seater", settings.train, settings.seater, ks=ks)
    seconds["train"] = time.time() - t
    _print_epochs("SEATER", seater.history, settings.train.select_metric)

    t = _stage(5, n, "evaluate both on the test users (Ray Data)")
    settings.eval.ks = ks
    results = {
        "seater": evaluate(seater.best_checkpoint, out / "dataset", "test", settings.eval, out=out / "seater"),
        "sasrec": evaluate(sasrec.best_checkpoint, out / "dataset", "test", settings.eval, out=out / "sasrec"),
    }
    seconds["evaluate"] = time.time() - t
    report = {
        **{name: _metric_subset(m) for name, m in results.items()},
        "settings": {"input": str(input_path), "format": fmt, "protocol": protocol,
                     **json.loads(settings.to_json())},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "counts": counts,
        "best_epoch": {"seater": seater.best_epoch, "sasrec": sasrec.best_epoch},
        "test_users": results["seater"]["users"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    table = results_table(report, ks)
    (out / "report.md").write_text(table + "\n")
    plot_training({"SEATER": seater.history, "SASRec": sasrec.history}, out / "training.png",
                  settings.train.select_metric)
    print("\n" + table)
    print(f"\nplot: {out / 'training.png'}   report: {out / 'report.json'}")
    return report


def _metric_subset(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "@" in k}


def _print_epochs(name: str, history: list[dict[str, Any]], metric: str) -> None:
    for rec in history:
        print(f"      {name} epoch {rec['epoch']:>2}: loss {rec.get('train_loss', float('nan')):.4f}  "
              f"valid {metric} {rec.get('valid_' + metric, float('nan')):.4f}  "
              f"({rec['train_seconds']:.0f} s train, {rec['samples_per_second']:,.0f} samples/s)", flush=True)


def results_table(report: dict[str, Any], ks: tuple[int, ...]) -> str:
    """Markdown table: one row per model, Recall/HR/NDCG at each K, and SEATER's relative gain."""
    cols = [f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in ks]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in ("seater", "sasrec"):
        lines.append(f"| {name} | " + " | ".join(f"{report[name].get(c, float('nan')):.4f}" for c in cols) + " |")
    gains = []
    for c in cols:
        base = report["sasrec"].get(c, 0.0)
        gains.append(f"{100 * (report['seater'].get(c, 0.0) / base - 1):+.1f}%" if base else "n/a")
    lines.append("| seater vs sasrec | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def plot_training(histories: dict[str, list[dict[str, Any]]], path: Path, metric: str) -> None:
    """Training loss and validation ``metric`` per epoch, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        epochs = [r["epoch"] for r in hist]
        ax_loss.plot(epochs, [r.get("train_loss", float("nan")) for r in hist], marker="o", label=name)
        ax_metric.plot(epochs, [r.get(f"valid_{metric}", float("nan")) for r in hist], marker="o", label=name)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_metric.set(title=f"validation {metric}", xlabel="epoch", ylabel=metric)
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI handlers


def _load_run_settings(path: str | None) -> RunSettings:
    return RunSettings.from_file(path) if path else RunSettings()


def _cmd_embed(a: argparse.Namespace) -> dict[str, Any]:
    from seater_dist.train.trainer import train_sasrec

    s = _load_run_settings(a.config)
    if a.workers:
        s.sasrec_train.workers = a.workers
    result = train_sasrec(a.data, a.out, s.sasrec_train, s.sasrec)
    return {"best epoch": result.best_epoch, **_best(result), "embeddings": str(Path(a.out) / "item_embeddings.npy"),
            "checkpoint": str(result.best_checkpoint)}


def _cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    from seater_dist.train.trainer import train_seater

    s = _load_run_settings(a.config)
    if a.workers:
        s.train.workers = a.workers
    result = train_seater(a.data, a.tree, a.out, s.train, s.seater, resume=a.resume)
    return {"best epoch": result.best_epoch, **_best(result), "checkpoint": str(result.best_checkpoint)}


def _best(result) -> dict[str, float]:
    return {k.removeprefix("valid_"): v for k, v in result.best_metrics.items() if k.startswith("valid_") and "@" in k}


def _cmd_evaluate(a: argparse.Namespace) -> dict[str, Any]:
    from seater_dist.data.dataset import load_dataset
    from seater_dist.eval.offline import evaluate

    from seater_dist.config import EvalSettings

    ks = _ks(load_dataset(a.data).protocol)
    metrics = evaluate(a.checkpoint, a.data, a.split, EvalSettings(ks=ks), out=a.out)
    return {k: v for k, v in metrics.items() if "@" in k or k in ("users", "seconds")}


def _cmd_recommend(a: argparse.Namespace) -> dict[str, Any]:
    from seater_dist.model.retriever import SeaterRetriever

    result = SeaterRetriever.from_checkpoint(a.checkpoint).recommend([a.history], top_n=a.top_n)[0]
    for rank, (item, score) in enumerate(zip(result["items"], result["scores"]), start=1):
        print(f"{rank:>3}. {item}  {score:.4f}")
    return {"ignored (unknown ids)": ", ".join(map(str, result["ignored"])) or "none"}


def _cmd_run(a: argparse.Namespace) -> dict[str, Any]:
    report = run_pipeline(a.input, a.format, a.protocol, a.out, _load_run_settings(a.config), a.workers)
    return {"seconds": sum(report["seconds"].values()), "report": str(Path(a.out) / "report.json")}


def _cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    from seater_dist.data.synth import synthesize

    settings = RunSettings.model_validate({**DEMO_CONFIG, **(_load_run_settings(a.config).model_dump(
        exclude_defaults=True) if a.config else {})})
    out = Path(a.out)
    print("[0/5] synth: the `small` preset (planted topic hierarchy, power-law popularity, drifting users)", flush=True)
    synth_dir = out / "synth"
    synthesize(SynthSettings(preset="small", out=str(synth_dir)))
    report = run_pipeline(str(synth_dir), "interactions", "comirec", out, settings, a.workers)
    return {"seconds": sum(report["seconds"].values()), "report": str(out / "report.json")}


CLI_COMMANDS = {
    "embed": _cmd_embed,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "recommend": _cmd_recommend,
    "run": _cmd_run,
    "demo": _cmd_demo,
}

__all__ = ["run_pipeline", "results_table", "plot_training", "CLI_COMMANDS"]
