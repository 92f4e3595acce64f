"""`seater run` and `seater demo` as library functions: every stage in order, each leaving its artifact
under ``out``:

    out/dataset/   prepare      (Ray Data)
    out/sasrec/    embed        (Ray Train: SASRec; item_embeddings.npy feeds the tree; the baseline)
    out/tree/      build-tree   (Ray tasks, level by level)
    out/seater/    train        (Ray Train DDP: SEATER)
    out/report.json, out/report.md, out/training.png   evaluate both on the same test users, compare

    report = run_pipeline("Beauty.txt", "sequences", "comirec", "runs/beauty", RunSettings())
    report.seater["recall@50"], report.sasrec["recall@50"]

``out`` may be a URI (``s3://bucket/run``): every stage then reads and writes its artifact there
(:mod:`seater_dist.artifacts`), nothing is left on the local disk but temporary files, and ``resume``
picks up what the bucket holds.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from seater_dist import artifacts
from seater_dist.artifacts import output_lock
from seater_dist.config import EvalSettings, PrepareSettings, RunSettings, SynthSettings, TrainSettings, metric_cutoffs
from seater_dist.data.dataset import load_dataset
from seater_dist.data.errors import DataError
from seater_dist.data.prepare import prepare
from seater_dist.data.synth import synthesize
from seater_dist.eval.compare import compare
from seater_dist.eval.offline import EvalResult, eval_demand, evaluate, finished_evaluation
from seater_dist.model.checkpoint import embeddings_provenance
from seater_dist.runtime import capacity
from seater_dist.train.trainer import TrainResult, resumable, train_demand, train_sasrec, train_seater
from seater_dist.tree.builder import build_tree, embeddings_sha256, load_embeddings
from seater_dist.tree.item_tree import ItemTree, TreeError

# The demo on a 2-core laptop (synth, prepare, SASRec, tree, SEATER, evaluation in about 5 minutes):
# both models get the same short epoch budget (a fair comparison), fewer SASRec negatives than the
# paper's; every other setting is the library default.
DEMO_EPOCHS = 6
DEMO_SETTINGS: dict[str, Any] = {
    "tree": {"k": 8},
    "sasrec": {"num_negatives": 256},  # 2,500 items: 256 shared negatives suffice
    "sasrec_train": {"epochs": DEMO_EPOCHS, "batch_size": 256},
    "train": {"epochs": DEMO_EPOCHS, "batch_size": 256},
}
STAGES = 5


@dataclass
class RunReport:
    """``report.json``: both models' test metrics on the same users, and how the run went."""

    seater: dict[str, float]
    sasrec: dict[str, float]
    settings: dict[str, Any]
    seconds: dict[str, float]
    counts: dict[str, int]
    best_epoch: dict[str, int]
    test_users: int
    ci95: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # model -> metric -> [lo, hi]
    paired: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> SEATER - SASRec: diff, ci95, p

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def with_workers(settings: RunSettings, workers: int | None) -> RunSettings:
    """A copy of ``settings`` whose two training stages use ``workers`` workers (None: unchanged)."""
    if workers is None:
        return settings
    return settings.model_copy(update={  # validated: a bad count fails here, naming the field
        "train": TrainSettings.model_validate({**settings.train.model_dump(), "workers": workers}),
        "sasrec_train": TrainSettings.model_validate({**settings.sasrec_train.model_dump(), "workers": workers}),
    })


def demo_settings(overrides: RunSettings | None = None) -> RunSettings:
    """DEMO_SETTINGS, with every field a user's config file sets on top (section by section, field by field)."""
    merged = {section: dict(fields) for section, fields in DEMO_SETTINGS.items()}
    if overrides is not None:
        for section, fields in overrides.model_dump(exclude_unset=True).items():
            merged.setdefault(section, {}).update(fields)
    return RunSettings.model_validate(merged)


def run_pipeline(input_path: str, fmt: str, protocol: str, out: str | Path, settings: RunSettings,
                 progress: Callable[[str], None] = print, resume: bool = False) -> RunReport:
    """prepare -> embed -> build-tree -> train -> evaluate both; writes report.json, report.md, training.png.

    ``resume``: keep every stage whose artifact under ``out`` is complete, continue an interrupted
    training run from its last epoch, and run the rest. ``out`` is held by this run alone (its output lock:
    a second run, or a stage run by hand into it, is refused at start; a URI has no lock: one run per prefix).
    """
    capacity.require(run_demands(settings))
    with artifacts.writer_lock(out, inside=True):
        return _run_pipeline(input_path, fmt, protocol, artifacts.path_or_uri(out), settings, progress, resume)


def run_demands(settings: RunSettings) -> list[capacity.Demand]:
    """What every Ray stage of a run asks the cluster for: checked before the first stage starts, so a setting
    the cluster can never meet (a GPU on a CPU cluster) fails at once, not after prepare."""
    return [train_demand("sasrec_train", settings.sasrec_train), train_demand("train", settings.train),
            eval_demand(settings.eval)]


def _run_pipeline(input_path: str, fmt: str, protocol: str, out: str | Path, settings: RunSettings,
                  progress: Callable[[str], None], resume: bool) -> RunReport:
    def at(*parts: str) -> str | Path:  # a stage's artifact under out (a URI stays one)
        return artifacts.path_or_uri(artifacts.join(out, *parts))

    ks = metric_cutoffs(protocol)
    seconds: dict[str, float] = {}

    def stage(i: int, name: str, text: str) -> float:
        progress(f"[{i}/{STAGES}] {text}")
        return time.time()

    t = stage(1, "prepare", f"prepare {input_path} ({fmt}, protocol {protocol})")
    counts = _finished_dataset(at("dataset")) if resume else None
    if counts is None:
        prep = prepare(PrepareSettings.build(input=str(input_path), format=fmt, protocol=protocol,
                                             out=str(at("dataset")), **settings.prepare.model_dump()))
        counts = {"users": prep.users, "items": prep.items, "interactions": prep.interactions}
    else:
        progress("      kept the finished dataset (--resume)")
    seconds["prepare"] = time.time() - t
    progress(f"      {counts['users']:,} users, {counts['items']:,} items, {counts['interactions']:,} interactions")

    t = stage(2, "embed", f"embed: SASRec ({settings.sasrec.loss} loss) on {settings.sasrec_train.workers} worker(s)")
    sasrec = _train_or_resume(progress, resume, at("sasrec"), settings.sasrec_train, "sasrec",
                              lambda again: train_sasrec(at("dataset"), at("sasrec"), settings.sasrec_train,
                                                         settings.sasrec, resume=again))
    seconds["embed"] = time.time() - t
    _report_epochs(progress, "SASRec", sasrec, settings.sasrec_train.select_metric)

    t = stage(3, "build-tree", f"build-tree: k = {settings.tree.k}")
    embeddings = at("sasrec", "item_embeddings.npy")
    tree = _finished_tree(at("tree"), embeddings) if resume else None
    if tree is None:
        tree = build_tree(load_embeddings(embeddings), settings.tree)
        tree.save(at("tree"), extra_manifest=embeddings_provenance(embeddings))
    else:
        progress("      kept the finished tree (--resume)")
    seconds["build_tree"] = time.time() - t
    progress(f"      {tree.num_items:,} items, depth {tree.depth}, {tree.num_internal:,} internal nodes")

    t = stage(4, "train", f"train: SEATER on {settings.train.workers} worker(s)")
    seater = _train_or_resume(progress, resume, at("seater"), settings.train, "seater", lambda again: train_seater(
        at("dataset"), at("tree"), at("seater"), settings.train, settings.seater, resume=again,
        embeddings=embeddings))
    seconds["train"] = time.time() - t
    _report_epochs(progress, "SEATER", seater, settings.train.select_metric)

    t = stage(5, "evaluate", "evaluate both on the test users (Ray Data)")
    results = {name: _evaluate_or_keep(progress, resume, run, at("dataset"), at(name, "eval_test"), settings.eval)
               for name, run in (("seater", seater), ("sasrec", sasrec))}
    seconds["evaluate"] = time.time() - t
    report = RunReport(
        seater=results["seater"].metrics, sasrec=results["sasrec"].metrics,
        settings={"input": str(input_path), "format": fmt, "protocol": protocol, **settings.model_dump(mode="json")},
        seconds={k: round(v, 1) for k, v in seconds.items()},
        counts=counts,
        best_epoch={"seater": seater.best_epoch, "sasrec": sasrec.best_epoch},
        test_users=results["seater"].users,
        ci95={name: result.ci95 for name, result in results.items()},
        paired=_paired(at("sasrec", "eval_test"), at("seater", "eval_test")),
    )
    table = results_table(report, ks) + "\n\n" + paired_table(report, ks)
    with tempfile.TemporaryDirectory(prefix="seater-plot-") as tmp:
        plot_training({"SEATER": seater.history, "SASRec": sasrec.history}, Path(tmp) / "training.png",
                      settings.train.select_metric)
        artifacts.write_bytes(at("training.png"), (Path(tmp) / "training.png").read_bytes())
    artifacts.write_bytes(at("report.md"), (table + "\n").encode())
    artifacts.write_bytes(at("report.json"), report.to_json().encode())  # last: the run is finished
    progress("\n" + table)
    progress(f"\nplot: {at('training.png')}   report: {at('report.json')}")
    return report


def _paired(sasrec_eval: str | Path, seater_eval: str | Path) -> dict[str, dict[str, Any]]:
    """SEATER against SASRec on the same test users, per metric: mean difference, its paired 95% interval,
    the paired p-value (seater_dist.eval.compare)."""
    comparison = compare(str(sasrec_eval), str(seater_eval))
    return {r.metric: {"diff": r.diff, "ci95": r.ci95, "p": r.p} for r in comparison.rows}


def _finished_dataset(path: str | Path) -> dict[str, int] | None:
    try:
        counts = load_dataset(path).manifest["counts"]
    except (DataError, KeyError):
        return None
    return {key: int(counts[key]) for key in ("users", "items", "interactions")}


def _finished_tree(path: str | Path, embeddings: str | Path) -> ItemTree | None:
    """The tree under ``path`` if it is whole and built from ``embeddings`` as they are now, else None."""
    try:
        tree = ItemTree.load(path, validate=False)
        current = embeddings_sha256(load_embeddings(embeddings))
    except (TreeError, OSError, ValueError):
        return None
    return tree if tree.manifest.get("embeddings_sha256") == current else None


def _train_or_resume(progress: Callable[[str], None], resume: bool, out: str | Path, settings: TrainSettings, task: str,
                     train: Callable[[bool], TrainResult]) -> TrainResult:
    """A finished run under ``out`` is kept on resume; an interrupted one continues; otherwise a fresh run."""
    if resume:
        done = TrainResult.load(out)
        if done is not None:
            progress(f"      kept the finished run in {out} (--resume)")
            return done
        return train(resumable(out, settings, task))
    return train(False)


def _evaluate_or_keep(progress: Callable[[str], None], resume: bool, run: TrainResult, dataset: str | Path,
                      out: str | Path, settings: EvalSettings) -> EvalResult:
    """A finished evaluation of the same weights under ``out`` is kept on resume; otherwise one is made."""
    if resume:
        done = finished_evaluation(run.best_checkpoint, dataset, "test", out)
        if done is not None:
            progress(f"      kept the finished evaluation in {out} (--resume)")
            return done
    return evaluate(run.best_checkpoint, dataset, "test", settings, out=out)


def run_demo(out: str | Path, settings: RunSettings, progress: Callable[[str], None] = print) -> RunReport:
    """Synthesise the `small` preset into ``out/synth``, then :func:`run_pipeline` on it (comirec)."""
    if artifacts.is_remote(out):
        raise ValueError(f"{out}: the demo writes to a local directory; `seater run --out URI` writes to object "
                         "storage")
    out = Path(out)
    with output_lock(out, inside=True):  # held from the synth on (run_pipeline re-enters it)
        progress("[0/5] synth: the `small` preset (planted topic hierarchy, power-law popularity, drifting users)")
        synthesize(SynthSettings(preset="small", out=str(out / "synth")))
        return run_pipeline(str(out / "synth"), "interactions", "comirec", out, settings, progress)


def _report_epochs(progress: Callable[[str], None], name: str, result: TrainResult, metric: str) -> None:
    for rec in result.history:
        progress(f"      {name} epoch {rec['epoch']:>2}: loss {rec.get('train_loss', float('nan')):.4f}  "
                 f"valid {metric} {rec.get('valid_' + metric, float('nan')):.4f}  "
                 f"({rec['train_seconds']:.0f} s train, {rec['samples_per_second']:,.0f} samples/s)")


def results_table(report: RunReport, ks: tuple[int, ...]) -> str:
    """Markdown table: one row per model, Recall/HR/NDCG at each K, and SEATER's relative gain."""
    cols = [f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in ks]
    rows = {"seater": report.seater, "sasrec": report.sasrec}
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics.get(c, float('nan')):.4f}" for c in cols) + " |")
    gains = []
    for c in cols:
        base = report.sasrec.get(c, 0.0)
        gains.append(f"{100 * (report.seater.get(c, 0.0) / base - 1):+.1f}%" if base else "n/a")
    lines.append("| seater vs sasrec | " + " | ".join(gains) + " |")
    return "\n".join(lines)


def paired_table(report: RunReport, ks: tuple[int, ...]) -> str:
    """Markdown: each model's 95% interval per metric, and SEATER - SASRec paired over the same users."""
    cols = [f"{m}@{k}" for m in ("recall", "hr", "ndcg") for k in ks if f"{m}@{k}" in report.paired]
    lines = [f"SEATER - SASRec on the same {report.test_users:,} test users (paired bootstrap 95% interval, "
             "sign-flip p; * p < 0.05):", "", "| metric | SASRec [95% CI] | SEATER [95% CI] | SEATER - SASRec "
             "[95% CI] | p |", "|---|---|---|---|---|"]
    for c in cols:
        lo_a, hi_a = report.ci95["sasrec"][c]
        lo_b, hi_b = report.ci95["seater"][c]
        pair = report.paired[c]
        lines.append(f"| {c} | {report.sasrec[c]:.4f} [{lo_a:.4f}, {hi_a:.4f}] | {report.seater[c]:.4f} "
                     f"[{lo_b:.4f}, {hi_b:.4f}] | {pair['diff']:+.4f} [{pair['ci95'][0]:+.4f}, "
                     f"{pair['ci95'][1]:+.4f}] | {pair['p']:.4f}{' *' if pair['p'] < 0.05 else ''} |")
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
