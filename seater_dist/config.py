"""Settings of every stage, as pydantic models: YAML/JSON in, errors that name the bad field out.

Each stage has one settings model. A run's config file holds one section per stage:

    # run.yaml
    prepare: {min_user_count: 5, min_item_count: 5, protocol: comirec}
    tree: {k: 8}
    seater: {lambda_ali: 0.05, lambda_rank: 0.05}
    train: {epochs: 30, workers: 2}

Load it with ``RunSettings.from_file("run.yaml")``; a typo or a bad value fails at load time:

    >>> RunSettings.model_validate({"tree": {"kk": 8}})
    Traceback (most recent call last):
    ...
    seater_dist.config.SettingsError: tree.kk: Extra inputs are not permitted
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class SettingsError(ValueError):
    """A settings file or dict that does not validate; the message names the field."""


class Settings(BaseModel):
    """Base of every settings model: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):  # type: ignore[override]
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as err:
            raise SettingsError(_describe(err, cls.__name__)) from None

    @classmethod
    def from_file(cls, path: str | Path):
        """Load from a YAML or JSON file; errors name the file and the field."""
        path = Path(path)
        if not path.exists():
            raise SettingsError(f"{path}: settings file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SettingsError(f"{path}: not valid YAML/JSON ({err})") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except SettingsError as err:
            raise SettingsError(f"{path}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def _describe(err: ValidationError, model: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or model
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# data/
# --------------------------------------------------------------------------------------------

InputFormat = Literal["sequences", "interactions", "movielens", "amazon", "yelp", "mind"]
Protocol = Literal["comirec", "loo"]


class PrepareSettings(Settings):
    """`seater prepare`: read raw logs, filter, re-index, split by protocol, write `dataset/`.

    Example: ``PrepareSettings(input="data/Beauty.txt", format="sequences", out="runs/beauty/dataset")``
    """

    input: str = Field(description="File or directory (local path or pyarrow.fs URI) of raw logs.")
    format: InputFormat = Field(description="Reader to use; see `seater prepare --help`.")
    out: str = Field(description="Output `dataset/` directory.")
    protocol: Protocol = "comirec"
    min_user_count: int = Field(5, ge=1, description="Drop users with fewer interactions.")
    min_item_count: int = Field(5, ge=1, description="Drop items with fewer interactions.")
    k_core: bool = Field(
        False, description="Iterate the two filters until both hold (a true k-core); else one pass (ComiRec)."
    )
    duplicates: Literal["keep", "drop_exact", "drop_consecutive"] = Field(
        "keep",
        description="keep: repeated (user, item) events stay; drop_exact: drop repeats with the same "
        "timestamp; drop_consecutive: drop an event that repeats the user's previous item.",
    )
    user_column: str | None = Field(None, description="interactions format: user column (default user_id).")
    item_column: str | None = Field(None, description="interactions format: item column (default item_id).")
    time_column: str | None = Field(None, description="interactions format: timestamp column (default timestamp).")
    seed: int = 0
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)
    history_fraction: float = Field(0.8, gt=0, lt=1, description="comirec: share of a valid/test sequence seen.")
    num_blocks: int = Field(0, ge=0, description="Ray Data partitions (0: choose from the input size).")


SynthPreset = Literal["tiny", "small", "microvideo"]


class SynthSettings(Settings):
    """`seater synth`: interactions with planted structure (topic hierarchy, power-law popularity,
    drifting user interests), written as partitioned parquet by parallel Ray tasks.

    Example: ``SynthSettings(preset="small", out="runs/synth_small")``
    """

    preset: SynthPreset = "small"
    out: str
    seed: int = 0
    num_users: int | None = Field(None, ge=1, description="Override the preset's user count.")
    num_items: int | None = Field(None, ge=1, description="Override the preset's item count.")
    num_interactions: int | None = Field(None, ge=1, description="Override the preset's interaction count.")
    num_partitions: int | None = Field(None, ge=1, description="Parquet files / Ray tasks.")


# --------------------------------------------------------------------------------------------
# tree/
# --------------------------------------------------------------------------------------------


class TreeSettings(Settings):
    """`seater build-tree`: the balanced k-ary item tree of SEATER_SPEC §1.

    Example: ``TreeSettings(k=16)``; ``TreeSettings(k=8, kind="random")`` for the ablation.
    """

    k: int = Field(8, ge=2, description="Branching factor.")
    kind: Literal["balanced", "unbalanced", "random"] = Field(
        "balanced",
        description="balanced: constrained k-means (SEATER); unbalanced: plain k-means, recursing while "
        "a group exceeds k (ablation); random: random balanced splits (ablation).",
    )
    exact_threshold: int = Field(
        0, ge=0, description="Nodes with at most this many items use exact constrained k-means "
        "(k-means-constrained, ~7 ms a node of 93 items); 0: never. See seater_dist/tree/builder.py.",
    )
    large_node: int = Field(
        100_000, ge=2, description="Nodes with more items are split alone (faiss k-means + balanced "
        "Lloyd); smaller nodes are stacked and split together by the batched method.",
    )
    n_init: int = Field(
        3, ge=1, description="Restarts on every node, the best kept; nodes above 512 items run 5x as many on a "
        "512-item sample. Worst node against k-means-constrained with 10 restarts (skewed nodes of 700 to 2,500 "
        "items, 32 per size): 1.028; at 312 items 1.122 (see seater_dist/tree/balanced_kmeans.py)."
    )
    kmeans_iters: int = Field(
        3, ge=1, description="Unconstrained Lloyd iterations: faiss k-means on large nodes runs at least 20; on "
        "the others they give the unconstrained objective reported next to ours.",
    )
    balanced_iters: int = Field(
        10, ge=1, description="Lloyd iterations with the balanced assignment (a node stops once no item moves). "
        "At 20k items, k = 8, over 8 seeds: worst objective 560.6 with 10, 550.3 with 20, 546.2 with 40, for "
        "+26% / +36% CPU (the later steps are cheap warm-started flows).",
    )
    price_steps: int = Field(2, ge=1, description="Sinkhorn steps per temperature of the approximate balanced "
                             "assignment used on nodes above large_node.")
    max_points_per_centroid: int = Field(
        65536, ge=39, description="faiss k-means trains on at most this many items per centroid."
    )
    task_items: int = Field(
        0, ge=0, description="Items per Ray task when small nodes are packed together (0: about "
        "level size / (4 x CPUs), between 2k and 400k).",
    )
    quality_sample_nodes: int = Field(
        2, ge=0, description="Nodes per level also solved by exact constrained k-means, to report "
        "our objective against it (only nodes of at most quality_sample_max_items items).",
    )
    quality_sample_max_items: int = Field(2000, ge=2)
    seed: int = 0


# --------------------------------------------------------------------------------------------
# model/
# --------------------------------------------------------------------------------------------


class SeaterSettings(Settings):
    """The SEATER model and its losses (SEATER_SPEC §2-§3, §5).

    Example: ``SeaterSettings(lambda_ali=0.05, lambda_rank=0.05, beam_size=50)``
    """

    d_model: int = Field(64, ge=8)
    n_heads: int = Field(2, ge=1)
    ffn_dim: int = Field(256, ge=8)
    dropout: float = Field(0.2, ge=0, lt=1)
    encoder_layers: int = Field(1, ge=1, le=12)
    decoder_layers: int = Field(1, ge=1, le=12)
    history_len: int = Field(20, ge=1, description="t: items of history the encoder reads.")
    use_alignment: bool = Field(True, description="L_ali (Eq. 6); off for the ablation.")
    use_ranking: bool = Field(True, description="L_rank (Eq. 7-8); off for the ablation.")
    lambda_ali: float = Field(0.05, ge=0)
    lambda_rank: float = Field(0.05, ge=0)
    tau: float = Field(0.2, gt=0, description="L_ali temperature.")
    beta: float = Field(0.001, ge=0, description="L_rank adaptive margin scale.")
    num_rank_negatives: int = Field(4, ge=1, description="q: negatives per positive identifier.")
    beam_size: int = Field(50, ge=1)
    embedding_init_std: float = Field(
        1.0, gt=0, description="Std of the token table's normal init: 1.0 as in the authors' code (SEATER_SPEC "
        "§2; the paper is silent). Rows move ~lr per Adam step, so at 1.0 rarely seen items learn slowly.",
    )

    def model_post_init(self, context: Any) -> None:
        if self.d_model % self.n_heads:
            raise SettingsError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


class SasrecSettings(Settings):
    """SASRec (SEATER_SPEC §6): the tree's item embeddings and the dual-encoder baseline.

    Example: ``SasrecSettings(loss="sampled", num_negatives=1280)``
    """

    d_model: int = Field(64, ge=8)
    n_heads: int = Field(2, ge=1)
    num_blocks: int = Field(2, ge=1, le=12)
    ffn_dim: int | None = Field(None, ge=8, description="Feed-forward width (default d_model, as SASRec).")
    dropout: float = Field(0.2, ge=0, lt=1)
    max_len: int = Field(50, ge=1, description="Longest training sequence (last items kept).")
    loss: Literal["sampled", "ce"] = Field("sampled", description="sampled softmax (paper) or full CE.")
    num_negatives: int = Field(1280, ge=1, description="Shared uniform negatives of the sampled softmax.")

    def model_post_init(self, context: Any) -> None:
        if self.d_model % self.n_heads:
            raise SettingsError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


# --------------------------------------------------------------------------------------------
# train/
# --------------------------------------------------------------------------------------------


class TrainSettings(Settings):
    """Ray Train loop settings shared by SEATER (`seater train`) and SASRec (`seater embed`).

    Example: ``TrainSettings(workers=2, cpus_per_worker=0.5, epochs=30, batch_size=256)``
    """

    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="Leave CPUs to Ray Data (1.0 each hangs on 2 CPUs).")
    use_gpu: bool = False
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1, description="Global batch (split over workers).")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    patience: int = Field(4, ge=1, description="Epochs without validation improvement before stopping.")
    select_metric: str = Field("recall@50", description="Validation metric that picks the best checkpoint.")
    max_valid_users: int | None = Field(None, ge=1, description="Validate on at most this many users.")
    max_failures: int = Field(2, ge=0, description="Worker failures to recover from (Ray Train).")
    storage_path: str | None = Field(None, description="Ray Train storage (local path or URI).")
    seed: int = 0


class EvalSettings(Settings):
    """`seater evaluate`: offline metrics with Ray Data batch inference."""

    ks: tuple[int, ...] = (20, 50)
    batch_size: int = Field(256, ge=1)
    max_users: int | None = Field(None, ge=1)


class RunSettings(Settings):
    """`seater run`: every stage's settings in one file (each section optional)."""

    prepare: dict[str, Any] = Field(default_factory=dict, description="Overrides of PrepareSettings.")
    tree: TreeSettings = Field(default_factory=TreeSettings)
    seater: SeaterSettings = Field(default_factory=SeaterSettings)
    sasrec: SasrecSettings = Field(default_factory=SasrecSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    sasrec_train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
