"""Two evaluations of the same users, compared pair by pair: is B better than A, and how sure is that?

Each metric is a mean over users, and both evaluations rank the same users, so the comparison is paired:
per user, ``d_u = B_u - A_u``. Reported per metric: A, B, B - A, the paired percentile-bootstrap 95%
interval of the mean difference, and the two-sided sign-flip permutation p-value
(:mod:`seater_dist.eval.stats`; fixed seed, so the same two evaluations always give the same table).

Only evaluations of the same split, catalogue and users, asked the same questions (histories and ground
truth), are compared; anything else is refused with a :class:`ComparisonError` saying what differs.

    comparison = compare("runs/demo/sasrec", "runs/demo/seater")   # A = SASRec, B = SEATER
    print(format_table(comparison))
    comparison.rows[0].metric, comparison.rows[0].diff, comparison.rows[0].p
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from seater_dist import artifacts
from seater_dist.artifacts import MANIFEST, ArtifactError
from seater_dist.eval import stats
from seater_dist.eval.offline import ARTIFACT, Evaluation, read_evaluation

ALPHA = 0.05  # rows with p below this are marked
# Where an evaluation is looked for under a directory that is not one: a model's training output
# (`seater train` / `seater embed` --out, evaluated beside its best/), then a `seater run` directory (SEATER's).
_SEARCH = ("", "eval_test", "eval_valid", "seater/eval_test", "seater/eval_valid")


class ComparisonError(ValueError):
    """Two evaluations that cannot be compared pair by pair (another split, catalogue or set of users)."""


@dataclass
class MetricComparison:
    """One metric: the means of A and B, B - A, its paired 95% interval, and the paired p-value."""

    metric: str
    a: float
    b: float
    diff: float
    ci95: list[float]
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


@dataclass
class Comparison:
    """A paired comparison of evaluations ``a`` and ``b`` (their directories) over ``users`` users."""

    a: str
    b: str
    model_a: str
    model_b: str
    split: str
    users: int
    rows: list[MetricComparison]
    method: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``--out`` JSON: the fields, each row with ``significant`` (p < 0.05)."""
        out = asdict(self)
        for row, saved in zip(self.rows, out["rows"]):
            saved["significant"] = row.significant
        return out


def find_evaluation(path: str) -> str:
    """``path`` if it is an evaluation directory, else the first evaluation under it: ``eval_test/``,
    ``eval_valid/`` (a training output), ``seater/eval_test/``, ``seater/eval_valid/`` (a `seater run`)."""
    for relative in _SEARCH:
        candidate = artifacts.join(path, relative) if relative else str(path)
        if _is_evaluation(candidate):
            return candidate
    looked = ", ".join(relative or "." for relative in _SEARCH)
    raise ArtifactError(f"{path}: no evaluation there (looked in {looked}); make one with `seater evaluate`")


def _is_evaluation(path: str) -> bool:
    try:
        return json.loads(artifacts.read_bytes(artifacts.join(path, MANIFEST))).get("artifact") == ARTIFACT
    except (OSError, ValueError, AttributeError):
        return False


def compare(a: str, b: str, resamples: int = stats.RESAMPLES, permutations: int = stats.PERMUTATIONS,
            seed: int = stats.SEED) -> Comparison:
    """Compare evaluation B against evaluation A (each a directory holding one, see :func:`find_evaluation`)."""
    first, second = read_evaluation(find_evaluation(a)), read_evaluation(find_evaluation(b))
    _check_comparable(first, second)
    names = [name for name in first.manifest["metrics"] if name in second.manifest["metrics"]]
    values_a, values_b = _aligned(first.per_user, names), _aligned(second.per_user, names)
    d = values_b - values_a
    bounds = stats.bootstrap_ci(d, resamples=resamples, seed=seed)
    p = stats.sign_flip_pvalue(d, permutations=permutations, seed=seed)
    rows = []
    for i, name in enumerate(names):
        mean_a, mean_b = math.fsum(values_a[:, i]) / len(d), math.fsum(values_b[:, i]) / len(d)
        rows.append(MetricComparison(name, mean_a, mean_b, math.fsum(d[:, i]) / len(d),
                                     [float(bounds[i, 0]), float(bounds[i, 1])], float(p[i])))
    method = {"interval": f"paired percentile bootstrap over users, {resamples} resamples",
              "p": f"two-sided paired sign-flip permutation test, {permutations} flips", "seed": seed,
              "alpha": ALPHA}
    return Comparison(first.path, second.path, first.manifest["model"], second.manifest["model"],
                      first.manifest["split"], len(d), rows, method)


def _check_comparable(a: Evaluation, b: Evaluation) -> None:
    """Refuse two evaluations that are not of the same split, catalogue, users and questions."""
    both = f"{a.path} and {b.path}"
    ma, mb = a.manifest, b.manifest
    if ma["split"] != mb["split"]:
        raise ComparisonError(f"{both}: not the same split ({ma['split']} and {mb['split']}); compare evaluations "
                              "of the same split")
    if ma["catalogue"] != mb["catalogue"]:
        raise ComparisonError(f"{both}: not the same catalogue ({ma['catalogue'][:12]} and {mb['catalogue'][:12]}); "
                              "compare models evaluated on the same dataset")
    users_a, users_b = _user_ids(a), _user_ids(b)
    if not np.array_equal(users_a, users_b):
        only = np.setxor1d(users_a, users_b)
        raise ComparisonError(f"{both}: not the same users ({len(users_a):,} and {len(users_b):,} users, {len(only):,} "
                              f"in only one, e.g. '{only[0]}'); evaluate both on the same dataset, split and max_users")
    if ma["questions"] != mb["questions"]:
        raise ComparisonError(f"{both}: the same users with other histories or ground truth (questions "
                              f"{ma['questions'][:12]} and {mb['questions'][:12]}); evaluate both on the same dataset")
    if not set(ma["metrics"]) & set(mb["metrics"]):
        raise ComparisonError(f"{both}: no metric in common")


def _user_ids(evaluation: Evaluation) -> np.ndarray:
    return np.sort(evaluation.per_user.column("user_id").to_numpy(zero_copy_only=False).astype(str))


def _aligned(table: pa.Table, names: list[str]) -> np.ndarray:
    """float64 [U, M]: the metrics' per-user values in raw user id order (the same rows in A and B)."""
    table = table.sort_by("user_id")
    return np.stack([table.column(name).to_numpy() for name in names], axis=1).astype(np.float64)


def format_table(c: Comparison) -> str:
    """The comparison as text: a header, then one row per metric (``*`` where p < 0.05)."""
    lines = [f"A: {c.a} ({c.model_a})", f"B: {c.b} ({c.model_b})",
             f"{c.users:,} {c.split} users, paired. 95% CI: {c.method['interval']}; p: {c.method['p']} "
             f"(seed {c.method['seed']}).", ""]
    width = max(len("metric"), *(len(r.metric) for r in c.rows))
    lines.append(f"{'metric':<{width}}  {'A':>7}  {'B':>7}  {'B-A':>8}  {'95% CI of B-A':<20}  {'p':>7}")
    for r in c.rows:
        interval = f"[{r.ci95[0]:+.4f}, {r.ci95[1]:+.4f}]"
        lines.append(f"{r.metric:<{width}}  {r.a:7.4f}  {r.b:7.4f}  {r.diff:+8.4f}  {interval:<20}  {r.p:7.4f}"
                     + ("  *" if r.significant else ""))
    lines.append(f"\n* p < {ALPHA:g}")
    return "\n".join(lines)


def write_comparison(c: Comparison, path: str) -> None:
    """The comparison as JSON at ``path`` (a file path or URI, written whole)."""
    artifacts.write_bytes(path, (json.dumps(c.to_dict(), indent=2) + "\n").encode())
