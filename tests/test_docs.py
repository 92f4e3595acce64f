"""The docs against the code: every default they quote is the default in seater_dist/config.py, every link
they make resolves, and they speak without lab-notebook words ("session 7", "the issue", "helper").

No Ray; a second or two. When a test here fails after you changed a default, change the doc sentence it
names (and the expected value below) in the same commit.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from seater_dist.config import RunSettings

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = RunSettings()
SECTIONS = set(RunSettings.model_fields)  # prepare, tree, seater, sasrec, train, sasrec_train, eval


def default(path: str) -> Any:
    """The default of ``section.field`` (``seater.beam_size``), from a RunSettings built with no input."""
    section, field = path.split(".")
    return getattr(getattr(DEFAULTS, section), field)


def read(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# 1. Defaults quoted in prose: (file, the exact phrase, the settings it quotes, their values in the phrase).
#    The phrase must be in the file (a reworded doc fails here: update the phrase) and each setting's
#    default must be the value the phrase gives (a changed default fails here: update the doc).
# --------------------------------------------------------------------------------------------

QUOTED = [
    ("README.md", "Train\nworkers take half a CPU each by default (`cpus_per_worker: 0.5`)",
     {"train.cpus_per_worker": 0.5}),
    ("README.md", "(`train: {max_failures: 2}`)", {"train.max_failures": 2}),
    ("README.md", "semantics by default (`train: {table_optimizer: adam}`", {"train.table_optimizer": "adam"}),
    ("docs/method.md", "d embedding size (64), b beam size (50), t history length (20)",
     {"seater.d_model": 64, "seater.beam_size": 50, "seater.history_len": 20}),
    ("docs/method.md", "**default 0.125** (= 1/√64", {"seater.embedding_init_std": 0.125}),
    ("docs/method.md", "(`seater.token_init: embeddings`, **the\ndefault since", {"seater.token_init": "embeddings"}),
    ("docs/method.md", "setting); **the default is 0.3**", {"seater.input_dropout": 0.3}),
    ("docs/method.md", "GELU, d = 64, 2 heads, FFN 256, dropout\n0.2", {"seater.d_model": 64, "seater.n_heads": 2,
                                                                         "seater.ffn_dim": 256, "seater.dropout": 0.2}),
    ("docs/method.md", "1 layer by default (the paper's main setting",
     {"seater.encoder_layers": 1, "seater.decoder_layers": 1}),
    ("docs/method.md", "same sizes, 1 layer by default", {"seater.decoder_layers": 1}),
    ("docs/method.md", "τ = 0.2 (0.3 on Yelp", {"seater.tau": 0.2}),
    ("docs/method.md", "sample q = 4 negatives", {"seater.num_rank_negatives": 4}),
    ("docs/method.md", "batch. β = 0.001", {"seater.beta": 0.001}),
    ("docs/method.md", "decay (1e-5, §4)", {"train.weight_decay": 1e-5}),
    ("docs/method.md", "**Optimiser.** Adam, lr 1e-3, weight decay 1e-5",
     {"train.lr": 1e-3, "train.weight_decay": 1e-5}),
    ("docs/method.md", "clip 1.0 over all parameters", {"train.grad_clip": 1.0}),
    ("docs/method.md", "global batch 256 split over the workers", {"train.batch_size": 256}),
    ("docs/method.md", "* **`adam` (default): dense Adam semantics**", {"train.table_optimizer": "adam"}),
    ("docs/method.md", "(`train.table_weight_decay`, default: `train.weight_decay`)",
     {"train.table_weight_decay": None}),
    ("docs/method.md", "`train.epochs` default 50", {"train.epochs": 50, "sasrec_train.epochs": 50}),
    ("docs/method.md", "`train.patience` default 5", {"train.patience": 5}),
    ("docs/method.md", "(`train.max_failures`, default 2)", {"train.max_failures": 2}),
    ("docs/method.md", "validation Recall@50 (`train.select_metric`)", {"train.select_metric": "recall@50"}),
    ("docs/method.md", "`tree.k` defaults to 8", {"tree.k": 8}),
    ("docs/method.md", "n <= `tree.large_node` (default 100,000)", {"tree.large_node": 100_000}),
    ("docs/method.md", "`tree.n_init` = 3 restarts", {"tree.n_init": 3}),
    ("docs/method.md", "n <= `tree.exact_threshold` (default 0: never)", {"tree.exact_threshold": 0}),
    ("docs/method.md", "d = 64, 2 heads, `num_blocks` 2", {"sasrec.d_model": 64, "sasrec.n_heads": 2,
                                                        "sasrec.num_blocks": 2}),
    ("docs/method.md", "dropout 0.2, `max_len` 50", {"sasrec.dropout": 0.2, "sasrec.max_len": 50}),
    ("docs/method.md", "Loss `sampled` (default, the paper's setting): softmax over the positive and 1,280",
     {"sasrec.loss": "sampled", "sasrec.num_negatives": 1280}),
    ("docs/method.md", "items with fewer than 5 interactions are dropped, then users with\nfewer than 5",
     {"prepare.min_item_count": 5, "prepare.min_user_count": 5, "prepare.k_core": False}),
    ("docs/method.md", "users are split 8:1:1", {"prepare.split_ratio": (0.8, 0.1, 0.1)}),
    ("docs/results.md", "| beam b | 5 | 10 | 20 | 50 (default) |", {"seater.beam_size": 50}),
    ("docs/results.md", "| **SASRec start + input dropout 0.3** (the default) |",
     {"seater.token_init": "embeddings", "seater.input_dropout": 0.3}),
    ("docs/results.md", "| **SEATER, SASRec start + input dropout 0.3 (default)** |",
     {"seater.token_init": "embeddings", "seater.input_dropout": 0.3}),
    ("docs/results.md", "the default `train.weight_decay` 1e-5 applies to it", {"train.weight_decay": 1e-5,
                                                                                 "train.table_weight_decay": None}),
    ("bench/README.md", "patience 5 (`TrainSettings`' defaults)", {"train.patience": 5}),
]


@pytest.mark.parametrize("doc,phrase,settings", QUOTED, ids=[f"{d}:{p[:40]}" for d, p, _ in QUOTED])
def test_quoted_default_matches_config(doc: str, phrase: str, settings: dict[str, Any]) -> None:
    assert phrase in read(doc), f"{doc} no longer says {phrase!r}: update QUOTED in tests/test_docs.py"
    for path, value in settings.items():
        assert default(path) == value, (f"{doc} says {phrase!r}, but {path} defaults to {default(path)!r} in "
                                        "seater_dist/config.py: fix the doc")


# --------------------------------------------------------------------------------------------
# 2. The "setting | default" tables of docs/method.md, parsed: every row, every value.
# --------------------------------------------------------------------------------------------

def _value(text: str) -> Any:
    text = text.strip().strip("`")
    try:
        return int(text.replace(",", ""))
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def method_default_rows() -> list[tuple[str, Any, str]]:
    """(section.field, quoted value, the table row) for every row of method.md's `| setting (`X:`) | default |`
    tables; "`a`, `b` | 1, 2" gives two entries, a value's trailing "(...)" comment is dropped."""
    rows: list[tuple[str, Any, str]] = []
    section = None
    for line in read("docs/method.md").splitlines():
        head = re.match(r"\| setting \(`(\w+):`\) \| default", line)
        if head:
            section = head.group(1)
            continue
        if section is None:
            continue
        if not line.startswith("|"):
            section = None
            continue
        if line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`([\w.]+)`", cells[0])
        values = [v for v in re.split(r",\s*", re.sub(r"\s*\(.*$", "", cells[1])) if v]
        assert len(names) == len(values), f"docs/method.md: cannot pair settings and defaults in {line!r}"
        for name, value in zip(names, values):
            rows.append((name if "." in name else f"{section}.{name}", _value(value), line))
    return rows


def test_method_tables_are_parsed() -> None:
    names = {name for name, _, _ in method_default_rows()}
    # if the tables are reshaped so that the parser no longer finds them, say so rather than pass vacuously
    assert {"seater.d_model", "seater.input_dropout", "seater.token_init", "seater.tau", "seater.beta",
            "train.weight_decay"} <= names, names


@pytest.mark.parametrize("path,value,row", method_default_rows(), ids=[r[0] for r in method_default_rows()])
def test_method_table_default_matches_config(path: str, value: Any, row: str) -> None:
    assert path.split(".")[0] in SECTIONS, row
    assert default(path) == value, (f"docs/method.md says {path} defaults to {value!r} ({row}); "
                                    f"seater_dist/config.py says {default(path)!r}")


def test_readme_example_config_loads_and_quotes_defaults() -> None:
    """README's run.yaml example is a valid settings file whose values are the defaults (it is read as
    such); give a non-default example a comment saying so, and drop it from this check."""
    block = re.search(r"```yaml\n# run\.yaml\n(.*?)```", read("README.md"), re.S)
    assert block, "README.md: the run.yaml example is gone"
    raw = yaml.safe_load(block.group(1))
    RunSettings.model_validate(raw)
    for section, fields in raw.items():
        for field, value in fields.items():
            assert default(f"{section}.{field}") == value, f"README run.yaml: {section}.{field}: {value!r}"


# --------------------------------------------------------------------------------------------
# 3. No lab-notebook words where a user reads, as `grep -rniE "session [0-9]|sessions [0-9]|the issue|helper"
#    README.md docs bench` would find them (over the files git tracks).
# --------------------------------------------------------------------------------------------

NOTEBOOK = re.compile(rb"session [0-9]|sessions [0-9]|the issue|helper", re.I)


def tracked(*paths: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, check=True)
        files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file under the paths
        files = [p for q in paths for p in ([ROOT / q] if (ROOT / q).is_file() else (ROOT / q).rglob("*"))]
    return [f for f in files if f.is_file()]


def test_no_lab_notebook_words() -> None:
    hits = []
    for path in tracked("README.md", "docs", "bench"):
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if NOTEBOOK.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.decode(errors='replace').strip()}")
    assert not hits, ("say when (a date and a commit) instead of 'session N', name the goal instead of "
                      "'the issue':\n" + "\n".join(hits))


# --------------------------------------------------------------------------------------------
# 4. Links: every relative link of the Markdown docs, and every docs path the code's messages and
#    docstrings cite, names a file that exists (and a heading that exists, for #anchors).
# --------------------------------------------------------------------------------------------

def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to '-')."""
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check_target(source: Path, target: str, base: Path) -> str | None:
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else source
    if not file.exists():
        return f"{source.relative_to(ROOT)}: {target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{source.relative_to(ROOT)}: {target}: no heading #{anchor} in {file.relative_to(ROOT)}"
    return None


def test_markdown_links_resolve() -> None:
    problems = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]:
        text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            problem = check_target(md, target, md.parent)
            if problem:
                problems.append(problem)
    assert not problems, "\n".join(problems)


def test_docs_cited_by_the_code_exist() -> None:
    """A message or docstring that sends the user to docs/x.md or some/README.md must name a real file
    (seater serve's error once pointed to docs/serving.md, build_app's docstring to serve/README.md)."""
    cite = re.compile(r"((?:docs/[\w.-]+|[\w-]+/README)\.md)(#[\w-]+)?")
    problems = []
    for path in tracked("seater_dist", "jobs", "bench", "serve", "cluster"):
        if path.suffix not in (".py", ".yaml", ".yml"):
            continue
        for match in cite.finditer(path.read_text(encoding="utf-8")):
            problem = check_target(path, match.group(1) + (match.group(2) or ""), ROOT)
            if problem:
                problems.append(problem)
    assert not problems, "\n".join(problems)
