"""`seater`: one sub-command per stage, plus `run` (all stages) and `demo` (`run` on built-in data).

Every command takes --address (or RAY_ADDRESS) to use a running Ray cluster, else starts a local one,
prints progress, ends with a one-screen summary, and exits != 0 with a one-line reason on bad input.
Each handler turns flags into a settings model, calls one library function, and returns that function's
typed result for the summary. The flags and help text of every command are in ``seater_dist.cli_parser``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from seater_dist.artifacts import check_apart, join
from seater_dist.cli_parser import NEEDS_RAY, Handler, build_parser
from seater_dist.config import RunSettings
from seater_dist.runtime.quiet import verbose


class CliError(ValueError):
    """A user-facing error: printed as one line, exit code 2."""


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


_HANDLERS: dict[str, Handler] = {
    "synth": _cmd_synth, "prepare": _cmd_prepare, "embed": _cmd_embed, "build-tree": _cmd_build_tree,
    "train": _cmd_train, "evaluate": _cmd_evaluate, "compare": _cmd_compare, "recommend": _cmd_recommend,
    "serve": _cmd_serve, "run": _cmd_run, "demo": _cmd_demo,
}


def _parser() -> argparse.ArgumentParser:
    return build_parser(_HANDLERS)


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
        if args.command in NEEDS_RAY:
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
