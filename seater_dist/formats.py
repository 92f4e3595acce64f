"""The input formats `seater prepare` reads: one registry, from which the settings' choices, the CLI's
``--format`` choices and help, and the readers' column defaults and file extensions all come.
(The parsers themselves live in ``seater_dist.data.readers``, keyed by the same names.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputFormat:
    """One raw-log format: what it is, its (user, item, time) columns, the file extensions it reads."""

    name: str
    description: str
    columns: tuple[str, str, str]
    extensions: tuple[str, ...]


FORMATS: dict[str, InputFormat] = {f.name: f for f in (
    InputFormat("sequences", "one line per user: `user item item ...` in time order",
                ("user", "items", "line"), (".txt", ".seq", ".csv", ".tsv", "")),
    InputFormat("interactions", "CSV/TSV with a header row, or parquet: user, item, timestamp columns "
                "(names via --user-column/--item-column/--time-column)",
                ("user_id", "item_id", "timestamp"), (".csv", ".tsv", ".parquet", ".pq", ".txt")),
    InputFormat("movielens", "RecBole `.inter` TSV or `ratings.dat` (UserID::MovieID::Rating::Timestamp)",
                ("user_id", "item_id", "timestamp"), (".inter", ".dat", ".csv", ".tsv")),
    InputFormat("amazon", "Amazon review JSON lines (reviewerID, asin, unixReviewTime)",
                ("reviewerID", "asin", "unixReviewTime"), (".json", ".jsonl", ".ndjson")),
    InputFormat("yelp", "Yelp review JSON lines (user_id, business_id, date)",
                ("user_id", "business_id", "date"), (".json", ".jsonl", ".ndjson")),
    InputFormat("mind", "MIND behaviors.tsv (history items, then clicked impressions)",
                ("user_id", "history", "time"), (".tsv",)),
)}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)

PROTOCOLS: dict[str, str] = {
    "comirec": "users split 8:1:1; valid/test users see the first 80% of their sequence, the rest is the "
               "ground truth (the paper's protocol)",
    "loo": "leave-one-out: each user's last item is the test target, the one before it the validation target",
}
PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS)

# The metric cut-offs each protocol reports. loo reports @20/@50 as well, so that Recall@50 (the
# default model-selection metric) exists under both protocols.
PROTOCOL_KS: dict[str, tuple[int, ...]] = {"comirec": (20, 50), "loo": (5, 10, 20, 50)}
METRICS: tuple[str, ...] = ("recall", "hr", "ndcg")
