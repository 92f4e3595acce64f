"""Quality on Amazon Beauty: SEATER against our SASRec (sampled softmax and full CE), both protocols,
plus the paper's Table 4 ablations, all trained and evaluated the same way on this machine.

    python -m bench.beauty_quality --data ../shared/data/beauty/Beauty.txt --out runs/beauty
    python -m bench.beauty_quality ... --only comirec            # one protocol
    python -m bench.beauty_quality ... --ablations --ce          # add the ablations and SASRec with full CE
    python -m bench.beauty_quality ... --only comirec --grid --ablation-epochs 5   # the paper's tuning grid
    python -m bench.beauty_quality ... --only comirec --seater-models seater --seed 1   # another seed of SEATER

Every stage is skipped when its artifact already exists, so an interrupted run continues where it
stopped. Results: OUT/results.json and OUT/results.md (one row per model, relative gain over SASRec).
Paper settings: k = 8, beam 50, d = 64, t = 20, lr 1e-3, batch 256, λa = λr = 0.05, τ = 0.2, β = 1e-3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from seater_dist.config import metric_cutoffs

ABLATIONS = {
    "seater": {},
    "seater w/o L_rank": {"use_ranking": False},
    "seater w/o L_ali": {"use_alignment": False},
    "seater w/o both": {"use_ranking": False, "use_alignment": False},
}
# Each fix of the training recipe, one at a time against the defaults ("seater"), and the levers against
# overfitting; compared on validation Recall@50 at the same epoch budget (--ablation-epochs), no test
# evaluation. Keys: SeaterSettings overrides, plus TRAIN_KEYS (TrainSettings) and TREE_KEYS (the tree:
# "k", and "tree_from", the SASRec whose embeddings the tree is built from). An override is against the
# defaults of the day the run was trained; each run's best/manifest.json records all of its settings.
VARIANTS = {
    "seater lazy adam": {"table_optimizer": "lazy_adam"},
    "seater authors init": {"embedding_init_std": 1.0},
    "seater no input dropout": {"input_dropout": 0.0},  # the faithful setting
    "seater input dropout 0.2": {"input_dropout": 0.2, "token_init": "random"},  # the default from 7d8ea81 to de6138c
    "seater input dropout 0.3": {"input_dropout": 0.3, "token_init": "random"},
    "seater tree from ce": {"tree_from": "ce"},
    "seater 2 layers": {"encoder_layers": 2, "decoder_layers": 2},
    "seater random start": {"token_init": "random", "input_dropout": 0.2},  # the paper's start; default until de6138c
    "seater start from sasrec": {"token_init": "embeddings", "input_dropout": 0.2},  # default from de6138c to c1b3e14
    "seater start from sasrec 2 layers": {"token_init": "embeddings", "input_dropout": 0.2, "encoder_layers": 2,
                                          "decoder_layers": 2},
    "seater start from sasrec dropout 0.3": {"token_init": "embeddings", "input_dropout": 0.3},  # the default now
    "seater l2 1e-4": {"weight_decay": 1e-4},
    "seater table l2 0": {"table_weight_decay": 0.0},  # dense Adam caught up per row: O(rows touched)
    # dense AdamW on the table, caught up per row at any decay: O(rows touched). Decoupled decay is not divided
    # by the gradient's scale as coupled L2 is, so 1e-5 would pull next to nothing: torch.optim.AdamW's 1e-2.
    "seater adamw table": {"table_optimizer": "adamw", "table_weight_decay": 1e-2},
    # the paper's Fig. 3: the same model over other trees of the same item embeddings
    "seater unbalanced tree": {"tree_kind": "unbalanced"},
    "seater random tree": {"tree_kind": "random"},
}
TRAIN_KEYS = ("weight_decay", "table_weight_decay", "table_optimizer")
TREE_KEYS = ("k", "tree_from", "tree_kind")
# The paper's tuning grid (§5.1), one factor at a time around the defaults (λa = λr = 0.05,
# β = 1e-3, L2 = 1e-5, k = 8): λ in [0.01, 0.09] step 0.02, β in {1e-2, 1e-3, 1e-4}, L2 in
# {1e-4, ..., 1e-7}, k in {2, ..., 32}. Points are picked on validation Recall@50 only; no test evaluation.
_GRID_BASE: dict[str, Any] = {}
GRID = {  # in the order they run: the ends of each range first
    **{f"grid lambda {v}": {**_GRID_BASE, "lambda_ali": v, "lambda_rank": v} for v in (0.01, 0.09)},
    **{f"grid beta {v:g}": {**_GRID_BASE, "beta": v} for v in (1e-2, 1e-4)},
    **{f"grid l2 {v:g}": {**_GRID_BASE, "weight_decay": v} for v in (1e-4, 1e-6)},
    **{f"grid k {v}": {**_GRID_BASE, "k": v} for v in (4, 16)},
    **{f"grid lambda {v}": {**_GRID_BASE, "lambda_ali": v, "lambda_rank": v} for v in (0.03, 0.07)},
    "grid l2 1e-07": {**_GRID_BASE, "weight_decay": 1e-7},
}


def _dir_name(model: str) -> str:
    """Directory of a SEATER variant's run: "seater w/o L_ali" -> "seater_wo_L_ali"."""
    return model.replace(" ", "_").replace("/", "").replace(".", "")


def run_protocol(data: str, out: Path, protocol: str, epochs: int, ablations: bool, ce: bool,
                 workers: int, resume: bool = False, ablation_epochs: int | None = None,
                 variants: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    from seater_dist.config import (
        EvalSettings,
        PrepareSettings,
        SasrecSettings,
        SeaterSettings,
        TrainSettings,
        TreeSettings,
    )
    from seater_dist.data.prepare import prepare
    from seater_dist.eval.offline import evaluate
    from seater_dist.train.trainer import train_sasrec, train_seater
    from seater_dist.tree import ItemTree
    from seater_dist.tree.builder import build_tree

    root = out / protocol
    ks = metric_cutoffs(protocol)
    # loo validates on every user (22k): a fixed sample of 5,000 keeps validation to seconds per epoch.
    train = TrainSettings(workers=workers, epochs=epochs, max_valid_users=5000 if protocol == "loo" else None)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    if not (root / "dataset" / "manifest.json").exists():
        prepare(PrepareSettings(input=data, format="sequences", protocol=protocol, out=str(root / "dataset")))

    def timed(name: str, fn):
        t = time.time()
        value = fn()
        seconds[name] = round(time.time() - t, 1)
        return value

    for loss in ("sampled", "ce") if ce else ("sampled",):
        name = f"sasrec ({loss})"
        ckpt = root / f"sasrec_{loss}"
        if not (ckpt / "best" / "manifest.json").exists():
            print(f"== {protocol}: training {name}", flush=True)
            timed(name, lambda: train_sasrec(root / "dataset", ckpt, train, SasrecSettings(loss=loss)))
        # -> ckpt/eval_test/
        results[name] = evaluate(ckpt / "best", root / "dataset", "test", EvalSettings()).to_dict()

    def tree_dir(k: int, source: str = "sampled", kind: str = "balanced") -> Path:
        """The k-ary tree over a SASRec's embeddings (sampled softmax or full CE), built once per (k, source,
        kind); kind "unbalanced" / "random" are the paper's Fig. 3 trees."""
        path = root / ("tree" + ("" if k == 8 else f"_k{k}") + ("" if source == "sampled" else f"_{source}")
                       + ("" if kind == "balanced" else f"_{kind}"))
        if not (path / "manifest.json").exists():
            emb = np.load(root / f"sasrec_{source}" / "item_embeddings.npy")
            built = timed(f"build-tree k={k} ({source}, {kind})",
                          lambda: build_tree(emb, TreeSettings(k=k, kind=kind)))
            built.save(path)
        return path

    tree = ItemTree.load(tree_dir(8))
    print(f"== {protocol}: tree over {tree.num_items:,} items, k = 8, depth {tree.depth}", flush=True)

    wanted = set(variants) if variants is not None else {"seater"} | (set(ABLATIONS) if ablations else set())
    for name, overrides in {**ABLATIONS, **VARIANTS, **GRID}.items():
        if name not in wanted:
            continue
        model = {key: v for key, v in overrides.items() if key not in TRAIN_KEYS + TREE_KEYS}
        budget = train if name == "seater" or not ablation_epochs else train.model_copy(
            update={"epochs": ablation_epochs})
        budget = budget.model_copy(update={**{key: overrides[key] for key in TRAIN_KEYS if key in overrides},
                                           "seed": seed})
        run = name + (f" seed {seed}" if seed else "")  # seed 0: the runs' names and directories of before
        ckpt = root / _dir_name(run)
        if not (ckpt / "best" / "manifest.json").exists():
            print(f"== {protocol}: training {run}", flush=True)
            tree_path = tree_dir(overrides.get("k", 8), overrides.get("tree_from", "sampled"),
                                 overrides.get("tree_kind", "balanced"))
            source = overrides.get("tree_from", "sampled")
            timed(run, lambda: train_seater(root / "dataset", tree_path, ckpt, budget, SeaterSettings(**model),
                                             resume=resume and (ckpt / "ray_results").exists(),
                                             embeddings=root / f"sasrec_{source}" / "item_embeddings.npy"))
        if name in GRID or name in VARIANTS:  # tuning runs are compared on validation only (see curves())
            continue
        # -> ckpt/eval_test/
        results[run] = evaluate(ckpt / "best", root / "dataset", "test", EvalSettings()).to_dict()
        results[run]["train_history_epochs"] = len(json.loads((ckpt / "history.json").read_text()))
    return {"metrics": results, "seconds": seconds, "tree_depth": tree.depth, "ks": ks}


def finalize_partial(out: Path, protocol: str) -> dict[str, Any]:
    """For runs stopped before they finished (time budget): evaluate the best epoch reported so far.

    Each epoch's Ray Train checkpoint holds the history up to that epoch; Ray keeps the best and the
    latest, so the best-so-far checkpoint is always on disk.
    """
    from seater_dist.config import EvalSettings
    from seater_dist.eval.offline import evaluate

    root = out / protocol
    found: dict[str, Any] = {}
    for run in sorted(root.glob("*/ray_results/*")):
        model_dir = run.parent.parent
        if model_dir.name.startswith("grid_"):  # tuning runs: validation only
            continue
        epochs = sorted(p for p in run.glob("epoch_*") if (p / "history.json").exists())
        if not epochs:
            continue
        history = json.loads((epochs[-1] / "history.json").read_text())
        best = max(history, key=lambda r: r["valid_recall@50"])
        best_dir = run / f"epoch_{best['epoch']:04d}"
        if (model_dir / "best" / "manifest.json").exists():  # finished: its own best copy
            best_dir = model_dir / "best"
        names = {_dir_name(n): n for n in [*ABLATIONS, *VARIANTS]}
        name = {"sasrec_sampled": "sasrec (sampled)", "sasrec_ce": "sasrec (ce)", **names}.get(
            model_dir.name, model_dir.name)
        metrics = evaluate(best_dir, root / "dataset", "test", EvalSettings(), out=model_dir / "eval_test").to_dict()
        finished = best_dir == model_dir / "best"
        metrics["note"] = (f"{len(history)} epochs, best epoch {best['epoch']}"
                           + ("" if finished else " (stopped by the time budget)"))
        found[name] = metrics
        print(f"{protocol}: {name}: {metrics['note']}", flush=True)
    return found


def _longest_history(model_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch records: its final history.json or its checkpoints' (a run resumed with more
    epochs has the longer one); [] if it has none."""
    found = [model_dir / "history.json", *sorted(model_dir.glob("ray_results/*/epoch_*/history.json"))]
    histories = [json.loads(p.read_text()) for p in found if p.exists()]
    return max(histories, key=len) if histories else []


def curves(out: Path, protocol: str, epochs: int = 6) -> str:
    """Validation Recall@50 of every model over its first ``epochs`` epochs (and its best), from the
    histories on disk: the ablations and variants ran on a short budget, so compare them with the full
    model at the same epoch."""
    rows = []
    for model_dir in sorted((out / protocol).iterdir()):
        history = _longest_history(model_dir)
        if not history:
            continue
        values = [f"{r['valid_recall@50']:.4f}" for r in history[:epochs]] + [""] * max(0, epochs - len(history))
        best = max(history, key=lambda r: r["valid_recall@50"])
        rows.append(f"| {model_dir.name} | " + " | ".join(values)
                    + f" | {best['valid_recall@50']:.4f} (epoch {best['epoch']} of {len(history)}) |")
    head = "| model | " + " | ".join(f"epoch {e}" for e in range(epochs)) + " | best |"
    return "\n".join([f"#### {protocol}: validation Recall@50 per epoch", "", head,
                      "|---|" + "---|" * (epochs + 1), *rows])


def grid_table(out: Path, protocol: str) -> str:
    """The tuning grid against its centre ("seater init std 0.125") at the grid's epoch budget:
    validation Recall@50 of each point's last epoch, and the centre's at the same epoch."""
    centre = _longest_history(out / protocol / _dir_name("seater"))
    rows = []
    for name, overrides in GRID.items():
        h = _longest_history(out / protocol / _dir_name(name))
        if not h or len(centre) < len(h):
            continue
        last, ref = h[-1]["valid_recall@50"], centre[len(h) - 1]["valid_recall@50"]
        changed = ", ".join(f"{k} = {v:g}" for k, v in overrides.items())
        rows.append(f"| {changed} | {len(h)} | {last:.4f} | {ref:.4f} | {100 * (last / ref - 1):+.1f}% |")
    if not rows:
        return ""
    return "\n".join([f"#### {protocol}: tuning grid (one factor at a time around the centre: λ = 0.05, "
                      "β = 1e-3, L2 = 1e-5, k = 8)", "",
                      "| changed | epochs | valid R@50 | centre at that epoch | change |", "|---|---|---|---|---|",
                      *rows])


def plot_curves(out: Path, protocol: str) -> Path | None:
    """OUT/PROTOCOL/validation_curves.png: validation Recall@50 by epoch of every run on disk (SASRec and
    SEATER variants alike), each run's best epoch marked."""
    from bench.plotting import pyplot, save

    plt = pyplot()

    runs = {d.name: h for d in sorted((out / protocol).iterdir()) if d.is_dir() and (h := _longest_history(d))}
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, history in runs.items():
        epochs, values = [r["epoch"] + 1 for r in history], [r["valid_recall@50"] for r in history]
        line, = ax.plot(epochs, values, label=name, linestyle="--" if name.startswith("sasrec") else "-")
        best = max(range(len(values)), key=values.__getitem__)
        ax.plot([epochs[best]], [values[best]], marker="o", color=line.get_color())
    ax.set(title=f"Amazon Beauty ({protocol}): validation Recall@50 by epoch", xlabel="epoch",
           ylabel="validation Recall@50")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / protocol / "validation_curves.png")


def write_report(out: Path, summary: dict[str, Any]) -> None:
    """OUT/results.md (test tables, validation curves per epoch, the grid) and one PNG of the curves per
    protocol; printed too."""
    md = "\n\n".join(table(p, r) + "\n\n" + curves(out, p) + "\n\n" + grid_table(out, p)
                     for p, r in summary.items())
    (out / "results.md").write_text(md + "\n")
    plots = [plot_curves(out, p) for p in summary]
    print("\n" + md, flush=True)
    print("plots: " + ", ".join(str(p) for p in plots if p), flush=True)


def table(protocol: str, res: dict[str, Any]) -> str:
    ks = res["ks"]
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + [f"hr@{k}" for k in ks if protocol == "comirec"]
    base = res["metrics"]["sasrec (sampled)"]
    lines = [f"### {protocol}", "",
             "| model | " + " | ".join(cols)
             + " | R@{} vs SASRec (sampled) |".format(ks[-1] if protocol == "comirec" else 10),
             "|---|" + "---|" * (len(cols) + 1)]
    key = f"recall@{ks[-1] if protocol == 'comirec' else 10}"
    for name, m in res["metrics"].items():
        gain = 100 * (m[key] / base[key] - 1) if base[key] else float("nan")
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + f" | {gain:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/beauty/Beauty.txt")
    p.add_argument("--out", default="runs/beauty")
    p.add_argument("--only", choices=["comirec", "loo"])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--resume", action="store_true",
                   help="continue SEATER runs stopped before they finished (e.g. with more --epochs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ablations", action="store_true", help="also train the three Table 4 ablations")
    p.add_argument("--ablation-epochs", type=int, default=None,
                   help="epoch budget of each ablation (default: --epochs); compare with the full model's "
                        "validation curve at the same epoch")
    p.add_argument("--ce", action="store_true", help="also train SASRec with full cross-entropy")
    p.add_argument("--grid", action="store_true",
                   help="train the paper's tuning grid (one factor at a time, --ablation-epochs each) instead; "
                        "compare the points on validation Recall@50 in results.md")
    p.add_argument("--seater-models", default=None,
                   help="comma-separated SEATER models to train instead, e.g. only the ablations (names: "
                        + ", ".join(repr(n) for n in [*ABLATIONS, *VARIANTS]) + "); all but 'seater' use "
                        "--ablation-epochs")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the SEATER runs' training (train.seed): torch's initial weights, the per-epoch "
                        "torch and numpy seeds of dropout and sampling, Ray Data's per-epoch shuffle of the "
                        "training users and the workers' local shuffle buffers. The dataset split, SASRec and "
                        "the tree stay seed 0's, so runs differ in SEATER's training only; a run of seed N != 0 "
                        "is named 'MODEL seed N' (directory MODEL_seed_N)")
    p.add_argument("--finalize", action="store_true",
                   help="evaluate the best epoch so far of runs that were stopped early, and write the tables")
    args = p.parse_args()

    from seater_dist.runtime.ray_env import init_ray

    init_ray()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "results.json"
    if args.finalize:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        for protocol in ([args.only] if args.only else ["comirec", "loo"]):
            entry = summary.setdefault(protocol, {"metrics": {}, "seconds": {}, "ks": list(metric_cutoffs(protocol))})
            entry["metrics"].update(finalize_partial(out, protocol))
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
        write_report(out, summary)
        return
    for protocol in ([args.only] if args.only else ["comirec", "loo"]):
        result = run_protocol(args.data, out, protocol, args.epochs, args.ablations, args.ce, args.workers,
                              args.resume, args.ablation_epochs,
                              list(GRID) if args.grid else
                              args.seater_models.split(",") if args.seater_models else None, args.seed)
        # Re-read: another invocation (the other protocol) may have written meanwhile.
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        previous = summary.get(protocol, {"metrics": {}, "seconds": {}})
        result["metrics"] = {**previous["metrics"], **result["metrics"]}
        result["seconds"] = {**previous["seconds"], **result["seconds"]}
        summary[protocol] = result
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
        write_report(out, summary)


if __name__ == "__main__":
    main()
