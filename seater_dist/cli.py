"""`seater`: one sub-command per stage, plus `run` (all stages) and `demo` (`run` on built-in data).

Every command takes --address (or RAY_ADDRESS) to use a running Ray cluster, else starts a local one,
prints progress, ends with a one-screen summary, and exits != 0 with a one-line reason on bad input.
Each handler turns flags into a settings model, calls one library function, and returns that function's
typed result for the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from seater_dist.artifacts import check_apart, join
from seater_dist.config import RunSettings
from seater_dist.formats import FORMAT_NAMES, FORMATS, PROTOCOL_NAMES, PROTOCOLS
from seater_dist.runtime.quiet import verbose

EPILOG = """\
Start here:
  seater demo --out runs/demo                      # synthetic data, every stage, about 5 minutes on 2 cores
  seater run --input Beauty.txt --format sequences --protocol comirec --out runs/beauty
  seater compare runs/beauty/sasrec runs/beauty/seater   # SEATER against SASRec on the same test users, paired
Use a cluster:  seater run ... --address ray://head:10001   (or export RAY_ADDRESS)
Object storage: every path may be a URI (s3://, gs://, hdfs://; credentials from the environment, e.g.
  AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID): seater run ... --out s3://bucket/runs/r1
Settings: every stage's settings live in one YAML file (--config), one section per stage; see docs/.
"""

EXAMPLES: dict[str, str] = {
    "synth": "  seater synth --preset small --out runs/synth_small\n"
    "  seater synth --preset microvideo --out /mnt/shared/microvideo --address auto",
    "prepare": "  seater prepare --input Beauty.txt --format sequences --protocol comirec --out runs/beauty/dataset\n"
    "  seater prepare --input ml-100k.inter --format movielens --protocol loo --out runs/ml/dataset\n"
    "  seater prepare --input logs.parquet --format interactions --user-column uid --item-column vid "
    "--time-column ts --out runs/mine/dataset",
    "embed": "  seater embed --data runs/beauty/dataset --out runs/beauty/sasrec",
    "build-tree": "  seater build-tree --embeddings runs/beauty/sasrec/item_embeddings.npy --k 8 "
    "--out runs/beauty/tree",
    "train": "  seater train --data runs/beauty/dataset --tree runs/beauty/tree --out runs/beauty/seater --workers 2\n"
    "  seater train --data runs/beauty/dataset --tree runs/beauty/tree --out runs/beauty/seater --resume",
    "evaluate": "  seater evaluate --checkpoint runs/beauty/seater/best --data runs/beauty/dataset --split test"
    "   # -> runs/beauty/seater/eval_test/\n"
    "  seater evaluate --checkpoint runs/beauty/sasrec/best --data runs/beauty/dataset --split test\n"
    "  seater evaluate --checkpoint runs/beauty/seater/best --data runs/beauty/dataset --out runs/beauty/eval_seater",
    "compare": "  seater compare runs/beauty/sasrec runs/beauty/seater    # A = SASRec, B = SEATER (their eval_test/)\n"
    "  seater compare runs/beauty/eval_seater runs/beauty_k16/seater/eval_test --out comparison.json\n"
    "  seater compare runs/beauty runs/beauty_k16               # two `seater run` outputs: SEATER against SEATER",
    "recommend": "  seater recommend --checkpoint runs/beauty/seater/best --history 12 873 9 --top-n 10",
    "run": "  seater run --input Beauty.txt --format sequences --protocol comirec --out runs/beauty\n"
    "  seater run --input Beauty.txt --format sequences --protocol loo --out runs/beauty_loo --config run.yaml\n"
    "  seater run --input s3://bucket/logs/ --format interactions --out s3://bucket/runs/r1   # object storage\n"
    "  seater run --input s3://bucket/logs/ --format interactions --out s3://bucket/runs/r1 --resume",
    "demo": "  seater demo --out runs/demo",
    "serve": "  seater serve --checkpoint runs/demo/seater/best --shards 2      # http://127.0.0.1:8000\n"
    "  seater serve --checkpoint runs/demo/sasrec/best --index hnsw --port 8001  # the SASRec baseline, same API\n"
    "  seater serve --checkpoint runs/demo/seater/best --layout single --direct-ingress  # fastest on one machine\n"
    "  seater serve --checkpoint /mnt/shared/run/seater/best --address auto --host 0.0.0.0\n"
    "  curl -s localhost:8000/recommend -H 'Content-Type: application/json' -d '{\"history\": [\"12\", \"873\"], "
    "\"top_n\": 10}'",
}

# Commands that start or join Ray before running.
_NEEDS_RAY = {"synth", "prepare", "embed", "build-tree", "train", "evaluate", "run", "demo"}


class CliError(ValueError):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``seater train: error: argument --workers: ...`` (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(value: str) -> int:
    """argparse type of a count flag (--workers, --top-n): a whole number >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {number}")
    return number


# ------------------------------------------------------------------------------------------ the parser


def _formats_help() -> str:
    return "input format: " + "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values()).replace("%", "%%")


def _protocol_help() -> str:
    return "evaluation protocol: " + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()).replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="seater",
        description="SEATER generative retrieval on Ray: prepare data, train SASRec and SEATER, "
        "build the item tree, evaluate, recommend.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, handler: Callable[[argparse.Namespace], Any]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog="examples:\n" + EXAMPLES[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(handler=handler)
        if name in _NEEDS_RAY:
            sp.add_argument("--address", default=None,
                            help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
        return sp

    def config(sp: argparse.ArgumentParser, sections: str) -> None:
        sp.add_argument("--config", help=f"YAML settings file; this command reads its {sections} section(s) "
                        "(a misspelt or invalid field fails before any work starts)")

    def workers(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workers", type=_count, help="Ray Train workers (default: the config's, else 2)")

    sp = add("synth", "Generate synthetic interactions with planted structure (partitioned parquet).", _cmd_synth)
    sp.add_argument("--preset", choices=["tiny", "small", "microvideo"], default="small",
                    help="size: tiny (tests), small (the demo), microvideo (0.75M users, 6.1M items, 85M rows)")
    sp.add_argument("--out", required=True, help="output directory of parquet parts")
    sp.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same data)")
    sp.add_argument("--num-users", type=int, help="override the preset's user count")
    sp.add_argument("--num-items", type=int, help="override the preset's item count")
    sp.add_argument("--num-interactions", type=int, help="override the preset's interaction count")
    sp.add_argument("--num-partitions", type=int, help="parquet files, one Ray task each")

    sp = add("prepare", "Read raw logs, filter, re-index and split them into a dataset/ directory.", _cmd_prepare)
    _input_flags(sp)
    sp.add_argument("--out", required=True, help="the dataset/ directory to write (replaced if it is one)")
    sp.add_argument("--min-user-count", type=int, default=5, help="drop users with fewer interactions (default 5)")
    sp.add_argument("--min-item-count", type=int, default=5, help="drop items with fewer interactions (default 5)")
    sp.add_argument("--k-core", action="store_true", help="iterate the two filters until both hold (a true k-core)")
    sp.add_argument("--duplicates", choices=["keep", "drop_exact", "drop_consecutive"], default="keep",
                    help="repeated (user, item) events: keep them, drop exact repeats (same timestamp), or drop "
                    "an event that repeats the user's previous item")
    sp.add_argument("--user-column", help="interactions: the user column (default user_id)")
    sp.add_argument("--item-column", help="interactions: the item column (default item_id)")
    sp.add_argument("--time-column", help="interactions: the timestamp column (default timestamp)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the comirec user split (default 0)")

    sp = add("embed", "Train SASRec (Ray Train) and write the item embeddings the tree is built from.", _cmd_embed)
    sp.add_argument("--data", required=True, help="a dataset/ directory (from `seater prepare`)")
    sp.add_argument("--out", required=True,
                    help="output directory: best/ checkpoint, item_embeddings.npy, history.json")
    workers(sp)
    config(sp, "`sasrec:` and `sasrec_train:`")

    sp = add("build-tree", "Build the balanced k-ary item tree from item embeddings (Ray tasks per level).",
             _cmd_build_tree)
    sp.add_argument("--embeddings", required=True, help=".npy float32 [N, d], one row per item (from `seater embed`)")
    sp.add_argument("--k", type=int, required=True, help="branching factor (8 for ~40k items, 16 for 300k+)")
    sp.add_argument("--out", required=True, help="the tree/ directory to write (replaced only if it is a tree)")
    sp.add_argument("--kind", choices=["balanced", "unbalanced", "random"], default="balanced",
                    help="balanced: constrained k-means (SEATER); unbalanced / random: the paper's ablations")
    config(sp, "`tree:`")

    sp = add("train", "Train SEATER with Ray Train (DDP), validating with beam search every epoch.", _cmd_train)
    sp.add_argument("--data", required=True, help="a dataset/ directory (from `seater prepare`)")
    sp.add_argument("--tree", required=True, help="a tree/ directory (from `seater build-tree`)")
    sp.add_argument("--out", required=True, help="output directory: best/ checkpoint, history.json, ray_results/")
    workers(sp)
    config(sp, "`seater:` and `train:`")
    sp.add_argument("--resume", action="store_true",
                    help="continue the stopped run under --out from its last epoch (an error if there is none)")
    sp.add_argument("--embeddings", help="the item embeddings .npy the tree was built from, which start the "
                    "token table (default: the file the tree's manifest records; `seater: {token_init: random}` "
                    "starts from a random table instead)")

    sp = add("evaluate", "Evaluate a SEATER or SASRec checkpoint on the valid or test users (Ray Data).",
             _cmd_evaluate)
    sp.add_argument("--checkpoint", required=True, help="a checkpoint directory (e.g. OUT/best of train or embed)")
    sp.add_argument("--data", required=True, help="the dataset/ directory the checkpoint was trained on")
    sp.add_argument("--split", choices=["valid", "test"], default="test", help="which users (default test)")
    sp.add_argument("--out", help="the evaluation directory to write: metrics.json (each metric and its 95%% "
                    "interval), per_user.parquet, manifest.json (default: eval_<split>/ beside the checkpoint; an "
                    "earlier evaluation there is replaced, any other directory refused)")
    config(sp, "`eval:`")

    sp = add("compare", "Compare two evaluations of the same users, paired: per metric A, B, B-A with its "
             "95-percent bootstrap interval, and a permutation-test p-value.", _cmd_compare)
    sp.add_argument("run_a", metavar="RUN_A", help="evaluation A: an evaluation directory (`seater evaluate`), or a "
                    "directory holding one: a training output (its eval_test/) or a `seater run` output (SEATER's)")
    sp.add_argument("run_b", metavar="RUN_B", help="evaluation B, the same way; the table reports B-A")
    sp.add_argument("--out", help="also write the comparison as JSON to this file")
    sp.add_argument("--resamples", type=_count, default=1000,
                    help="bootstrap resamples of each interval (default 1000)")
    sp.add_argument("--permutations", type=_count, default=5000,
                    help="random sign flips of each p-value (default 5000; the smallest p is 1/(1 + this))")
    sp.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0: same input, same table)")

    sp = add("recommend", "Recommend items for one history from a SEATER checkpoint (raw item ids).", _cmd_recommend)
    sp.add_argument("--checkpoint", required=True, help="a SEATER checkpoint directory")
    sp.add_argument("--history", nargs="+", required=True, help="raw item ids, oldest first")
    sp.add_argument("--top-n", type=_count, default=10, help="how many items (1..beam size, default 10)")

    sp = add("serve", "Serve a SEATER or SASRec checkpoint over HTTP with Ray Serve until Ctrl-C "
             "(POST /recommend, GET /healthz, GET /version).", _cmd_serve)
    sp.add_argument("--checkpoint", required=True, help="a SEATER or SASRec checkpoint directory (or pyarrow.fs URI)")
    sp.add_argument("--shards", type=int, default=1, help="search shards: SEATER splits the tree's top-level "
                    "subtrees among them (1..k), SASRec the items (default 1)")
    sp.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default 127.0.0.1, loopback only; "
                    "0.0.0.0 to listen on every interface)")
    sp.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sp.add_argument("--address", default=None, help="deploy onto the running Ray cluster at this address "
                    "(default: $RAY_ADDRESS, else a local Ray on 127.0.0.1 that stops with this command)")
    sp.add_argument("--beam-size", type=int, help="SEATER: beam size, the largest top_n (default: the "
                    "checkpoint's); SASRec: the largest top_n (default 50)")
    sp.add_argument("--popularity", help="a dataset directory (or its items.parquet) whose counts rank the items "
                    "returned for a history with no known item (default: the dataset beside the checkpoint when "
                    "its items match, else the model's answer to an empty history)")
    sp.add_argument("--index", choices=["flat", "hnsw"], default="flat",
                    help="SASRec: exact inner product (flat) or HNSW (approximate, faster at millions of items)")
    sp.add_argument("--ef-search", type=int, default=128, help="SASRec HNSW: candidates per query (default 128)")
    sp.add_argument("--min-replicas", type=int, default=1, help="replicas every deployment starts with and keeps "
                    "(default 1; a new replica takes as long as loading the checkpoint; at most --max-replicas)")
    sp.add_argument("--max-replicas", type=int, default=2, help="autoscaling ceiling of every deployment (default 2)")
    sp.add_argument("--layout", choices=["split", "single"], default="split",
                    help="split: router, encoder and shard deployments, each scaled on its own (default); single: "
                         "one deployment holding all of them (fewer hops: less CPU and latency per request)")
    sp.add_argument("--direct-ingress", action="store_true",
                    help="local Ray only: each router replica also answers HTTP on its own port (--port + 1 and "
                         "up), skipping the HTTP proxy's hop (less CPU and latency per request); --port stays the "
                         "proxy, balancing over the replicas")

    sp = add("run", "Run every stage: prepare, embed, build-tree, train, evaluate, report.", _cmd_run)
    _input_flags(sp)
    sp.add_argument("--out", required=True, help="directory or URI (s3://bucket/run, credentials from the "
                                                  "environment) for every stage's artifact and report.json")
    sp.add_argument("--resume", action="store_true",
                    help="keep the stages that finished under --out and continue an interrupted training run")
    config(sp, "every stage's")
    workers(sp)

    sp = add("demo", "Run every stage on a built-in synthetic dataset (the `small` preset), about 5 minutes.",
             _cmd_demo)
    sp.add_argument("--out", required=True, help="directory for every stage's artifact and report.json")
    config(sp, "every stage's (on top of the demo's short epoch budgets)")
    workers(sp)
    return p


def _input_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--input", required=True, help="file or directory of raw logs (local path or pyarrow.fs URI)")
    sp.add_argument("--format", required=True, choices=FORMAT_NAMES, help=_formats_help())
    sp.add_argument("--protocol", choices=PROTOCOL_NAMES, default="comirec", help=_protocol_help())


# ------------------------------------------------------------------------------------------ handlers


def _run_settings(path: str | None) -> RunSettings:
    return RunSettings.from_file(path) if path else RunSettings()


def _cmd_synth(a: argparse.Namespace) -> Any:
    from seater_dist.config import SynthSettings
    from seater_dist.data.synth import synthesize

    return synthesize(SynthSettings.build(preset=a.preset, out=a.out, seed=a.seed, num_users=a.num_users,
                                          num_items=a.num_items, num_interactions=a.num_interactions,
                                          num_partitions=a.num_partitions))


def _cmd_prepare(a: argparse.Namespace) -> Any:
    from seater_dist.config import PrepareSettings
    from seater_dist.data.prepare import prepare

    return prepare(PrepareSettings.build(
        input=a.input, format=a.format, protocol=a.protocol, out=a.out, min_user_count=a.min_user_count,
        min_item_count=a.min_item_count, k_core=a.k_core, duplicates=a.duplicates, user_column=a.user_column,
        item_column=a.item_column, time_column=a.time_column, seed=a.seed))


def _cmd_embed(a: argparse.Namespace) -> Any:
    from seater_dist.pipeline import with_workers
    from seater_dist.train.trainer import train_sasrec

    s = with_workers(_run_settings(a.config), a.workers)
    result = train_sasrec(a.data, a.out, s.sasrec_train, s.sasrec)
    return {**_train_summary(result), "embeddings": join(a.out, "item_embeddings.npy")}


def _cmd_build_tree(a: argparse.Namespace) -> Any:
    from seater_dist.artifacts import check_replaceable, writer_lock
    from seater_dist.model.checkpoint import embeddings_provenance
    from seater_dist.tree.builder import build_tree, load_embeddings

    settings = _run_settings(a.config).tree.model_copy(update={"k": a.k, "kind": a.kind})
    settings = type(settings).model_validate(settings.model_dump())  # validate the flags' values too
    check_replaceable(a.out, "tree")
    emb = load_embeddings(a.embeddings)
    with writer_lock(a.out):
        t0 = time.time()
        tree = build_tree(emb, settings)
        tree.save(a.out, extra_manifest=embeddings_provenance(a.embeddings))
    return {"items": tree.num_items, "k": tree.k, "depth": tree.depth, "tokens": tree.num_tokens,
            "seconds": round(time.time() - t0, 1), "out": a.out}


def _cmd_train(a: argparse.Namespace) -> Any:
    from seater_dist.pipeline import with_workers
    from seater_dist.train.trainer import train_seater

    s = with_workers(_run_settings(a.config), a.workers)
    return _train_summary(train_seater(a.data, a.tree, a.out, s.train, s.seater, resume=a.resume,
                                       embeddings=a.embeddings))


def _train_summary(result: Any) -> dict[str, Any]:
    best = {k.removeprefix("valid_"): v for k, v in result.best_metrics.items() if k.startswith("valid_") and "@" in k}
    return {"best epoch": result.best_epoch, **best, "checkpoint": str(result.best_checkpoint)}


def _cmd_evaluate(a: argparse.Namespace) -> Any:
    from seater_dist.eval.offline import evaluate

    result = evaluate(a.checkpoint, a.data, a.split, _run_settings(a.config).eval, out=a.out)
    rows = {name: f"{value:.4f}  (95% CI {result.ci95[name][0]:.4f}-{result.ci95[name][1]:.4f})"
            for name, value in result.metrics.items()}
    return {**rows, "model": result.model, "users": result.users, "seconds": result.seconds, "out": result.out}


def _cmd_compare(a: argparse.Namespace) -> Any:
    from seater_dist.eval.compare import compare, format_table, write_comparison

    result = compare(a.run_a, a.run_b, resamples=a.resamples, permutations=a.permutations, seed=a.seed)
    print(format_table(result))
    if a.out:
        write_comparison(result, a.out)
    better = [r.metric for r in result.rows if r.significant and r.diff > 0]
    worse = [r.metric for r in result.rows if r.significant and r.diff < 0]
    return {"users": result.users, "B better (p < 0.05)": ", ".join(better) or "none",
            "B worse (p < 0.05)": ", ".join(worse) or "none", **({"json": a.out} if a.out else {})}


def _cmd_recommend(a: argparse.Namespace) -> Any:
    from seater_dist.model.retriever import SeaterRetriever

    blank = [i for i, item in enumerate(a.history) if not item.strip()]
    if blank:
        raise CliError(f"--history: item id {blank[0] + 1} of {len(a.history)} is empty ({a.history[blank[0]]!r}); "
                       "give raw item ids separated by spaces, e.g. --history 12 873 9")
    result = SeaterRetriever.from_checkpoint(a.checkpoint).recommend([a.history], top_n=a.top_n)[0]
    for rank, (item, score) in enumerate(zip(result["items"], result["scores"]), start=1):
        print(f"{rank:>3}. {item}  {score:.4f}")
    ignored = result["ignored"]
    return {"ignored (unknown ids)": ", ".join(repr(str(i)) for i in ignored) if ignored else "none"}


def _cmd_serve(a: argparse.Namespace) -> Any:
    from seater_dist.config import parse_serve_args
    from seater_dist.serve.runner import run_service

    args = parse_serve_args(dict(checkpoint=a.checkpoint, shards=a.shards, beam_size=a.beam_size,
                                 popularity=a.popularity, index=a.index, ef_search=a.ef_search,
                                 min_replicas=a.min_replicas, max_replicas=a.max_replicas, layout=a.layout))
    return run_service(args, host=a.host, port=a.port, address=a.address, direct_ingress=a.direct_ingress)


def _cmd_run(a: argparse.Namespace) -> Any:
    from seater_dist.pipeline import run_pipeline, with_workers

    settings = with_workers(_run_settings(a.config), a.workers)
    report = run_pipeline(a.input, a.format, a.protocol, a.out, settings, resume=a.resume)
    return {"seconds": sum(report.seconds.values()), "report": join(a.out, "report.json")}


def _cmd_demo(a: argparse.Namespace) -> Any:
    from seater_dist.pipeline import demo_settings, run_demo, with_workers

    settings = with_workers(demo_settings(RunSettings.from_file(a.config) if a.config else None), a.workers)
    report = run_demo(a.out, settings)
    return {"seconds": sum(report.seconds.values()), "report": str(Path(a.out) / "report.json")}


# ------------------------------------------------------------------------------------------ main


def _summary_rows(result: Any) -> dict[str, Any]:
    """A stage's result as summary rows: dataclass fields, nested mappings as "field: key"."""
    fields = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    rows: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            rows.update({f"{key}: {k}": v for k, v in value.items()})
        else:
            rows[key.replace("_", " ")] = value
    return rows


def _print_summary(title: str, rows: dict[str, Any]) -> None:
    width = max((len(k) for k in rows), default=0)
    print(f"\n== {title} ==")
    for key, value in rows.items():
        if isinstance(value, float):
            value = f"{value:,.4f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Our stages log their progress ("read 85,000,000 valid rows in 183 s") at INFO.
    ours = logging.getLogger("seater_dist")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    if not args.command:
        parser.print_help()
        return 0
    try:
        if getattr(args, "config", None):  # fail on a bad settings file before starting Ray
            RunSettings.from_file(args.config)
        if args.command in ("prepare", "run"):  # and on an output inside the input (run's holds dataset/ etc.)
            check_apart(args.input, args.out, CliError)
        if args.command in _NEEDS_RAY:
            from seater_dist.runtime.ray_env import init_ray

            init_ray(args.address)
        if not verbose():
            from seater_dist.runtime.errors import hide_duplicate_error_reports

            hide_duplicate_error_reports()
        t0 = time.time()
        result = args.handler(args)
        if result:
            _print_summary(f"seater {args.command} done in {time.time() - t0:,.1f} s", _summary_rows(result))
        return 0
    except (Exception, KeyboardInterrupt) as err:  # the one error path: wherever it was raised, one line
        return _report_error(args, err)


def _report_error(args: argparse.Namespace, err: BaseException) -> int:
    """Print ``err`` as ``seater <command>: error: <message>`` (its traceback first with SEATER_VERBOSE=1);
    -> the exit code (seater_dist.runtime.errors.describe)."""
    from seater_dist.runtime.errors import EXIT_INTERRUPTED, describe

    message, code = describe(err)
    if verbose():
        traceback.print_exception(err)
    if code == EXIT_INTERRUPTED:
        print(f"seater {args.command}: interrupted{_after_interrupt(args)}", file=sys.stderr)
    else:
        print(f"seater {args.command}: error: {message}", file=sys.stderr)
    return code


def _after_interrupt(args: argparse.Namespace) -> str:
    """What a Ctrl-C left behind, and how to go on."""
    out = getattr(args, "out", None)
    if args.command == "train":
        return (f"; {out} keeps every finished epoch: run the same command"
                f"{'' if args.resume else ' with --resume'} to continue")
    if args.command in ("prepare", "build-tree"):
        return f"; {out} is as it was (an output is replaced only once complete)"
    if args.command in ("run", "demo"):
        return f"; the stages that finished are kept under {out}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
