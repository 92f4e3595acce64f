"""Recall against beam size: one trained SEATER checkpoint, the same users, beams from 5 to 500.

    python -m bench.beam_sweep --checkpoint runs/beauty/comirec/seater_input_dropout_02/best \
        --data runs/beauty/comirec/dataset --sasrec runs/beauty/comirec/sasrec_sampled/best

Beam search keeps the b best prefixes at every level, so a larger beam can only find more of what the model
itself ranks high; this measures how much Recall@20/50 that is worth and what it costs (ms per user, one
thread, batches of 256 users, in this process: no Ray; one untimed warm-up batch first). A beam b returns only
b items, so below 20 (50) Recall@20 (@50) counts b items. With --sasrec, the same users' exact inner-product
search is the reference line.
Validation users by default: an analysis must not spend the test users.

Writes bench/results/beam_sweep.json and a PNG (default docs/img/beam_sweep.png).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
KS = (20, 50)


def users_of(data: Path, split: str, limit: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(histories, ground truths) of a split's users, item indices, in user_index order."""
    from seater_dist.data.dataset import load_dataset

    table = load_dataset(data).table(split).sort_by("user_index")
    if limit:
        table = table.slice(0, limit)
    histories = [np.asarray(h, dtype=np.int64) for h in table.column("history").to_pylist()]
    truth = [np.asarray(g, dtype=np.int64) for g in table.column("ground_truth").to_pylist()]
    return histories, truth


def ranked(ckpt: Any, histories: list[np.ndarray], beam: int | None, batch: int = 256) -> tuple[np.ndarray, float]:
    """Top-50 of every user (-1 padded when the beam is smaller) and the seconds it took."""
    import torch

    from seater_dist.data.samples import left_pad

    out = np.full((len(histories), max(KS)), -1, dtype=np.int64)
    if beam is not None:  # warm-up (first calls allocate), not timed
        ckpt.model.beam_search(torch.from_numpy(left_pad(histories[:batch], ckpt.model.settings.history_len,
                                                         ckpt.model.pad)), beam, min(beam, max(KS)))
    t0 = time.perf_counter()
    for start in range(0, len(histories), batch):
        part = histories[start : start + batch]
        if beam is None:  # SASRec: exact search
            out[start : start + len(part)] = ckpt.topk(part, max(KS))
            continue
        model = ckpt.model
        history = torch.from_numpy(left_pad(part, model.settings.history_len, model.pad))
        items, _ = model.beam_search(history, beam, min(beam, max(KS)))
        out[start : start + len(part), : items.shape[1]] = items.numpy()
    return out, time.perf_counter() - t0


def plot(rows: list[dict[str, Any]], reference: dict[str, float] | None, title: str, path: Path) -> None:
    from bench.plotting import pyplot, save

    plt = pyplot()

    beams = [r["beam"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for k, style in zip(KS, ("-o", "-s")):
        line, = left.plot(beams, [r[f"recall@{k}"] for r in rows], style, label=f"SEATER Recall@{k}")
        if reference:
            left.axhline(reference[f"recall@{k}"], color=line.get_color(), linestyle="--",
                         label=f"SASRec exact Recall@{k}")
    left.set(xscale="log", xlabel="beam size b", ylabel="recall", title="quality")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(beams, [r["ms_per_user"] for r in rows], "-o")
    right.set(xscale="log", yscale="log", xlabel="beam size b", ylabel="ms per user (1 thread)", title="cost")
    right.grid(alpha=0.3)
    fig.suptitle(title)
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained SEATER checkpoint directory")
    ap.add_argument("--data", type=Path, required=True, help="the dataset it was trained on")
    ap.add_argument("--sasrec", type=Path, help="a SASRec checkpoint of the same dataset: the reference line")
    ap.add_argument("--split", choices=["valid", "test"], default="valid", help="users to rank (default valid)")
    ap.add_argument("--beams", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200, 500])
    ap.add_argument("--users", type=int, default=None, help="at most this many users (default all)")
    ap.add_argument("--plot", type=Path, default=Path("docs/img/beam_sweep.png"))
    ap.add_argument("--out", type=Path, default=RESULTS / "beam_sweep.json")
    args = ap.parse_args()

    import torch

    from seater_dist.eval.metrics import per_user_metrics
    from seater_dist.model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    histories, truth = users_of(args.data, args.split, args.users)
    ckpt = load_checkpoint(args.checkpoint)

    def scores(topk: np.ndarray) -> dict[str, float]:
        values = per_user_metrics(topk, truth, ks=KS)
        return {f"recall@{k}": float(values[f"recall@{k}"].mean()) for k in KS}

    rows = []
    with torch.inference_mode():
        for beam in args.beams:
            topk, seconds = ranked(ckpt, histories, beam)
            rows.append({"beam": beam, **scores(topk), "ms_per_user": 1000 * seconds / len(histories)})
            print(f"beam {beam:>4}: Recall@20 {rows[-1]['recall@20']:.4f}  Recall@50 {rows[-1]['recall@50']:.4f}  "
                  f"{rows[-1]['ms_per_user']:.2f} ms/user", flush=True)
        reference = None
        if args.sasrec:
            topk, seconds = ranked(load_checkpoint(args.sasrec), histories, None)
            reference = {**scores(topk), "ms_per_user": 1000 * seconds / len(histories)}
            print(f"SASRec exact: Recall@20 {reference['recall@20']:.4f}  Recall@50 {reference['recall@50']:.4f}  "
                  f"{reference['ms_per_user']:.2f} ms/user", flush=True)
    title = f"{args.checkpoint}: {len(histories):,} {args.split} users"
    plot(rows, reference, title, args.plot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split, "users": len(histories),
                                    "rows": rows, "sasrec_exact": reference}, indent=2))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
