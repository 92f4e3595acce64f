"""Settings of every stage, as pydantic models: YAML/JSON in, errors that name the bad field out.

Each stage has one settings model. A run's config file holds one section per stage:

    # run.yaml
    prepare: {min_user_count: 5, min_item_count: 5}
    tree: {k: 8}
    seater: {lambda_ali: 0.05, lambda_rank: 0.05}
    train: {epochs: 30, workers: 2}

Load it with ``RunSettings.from_file("run.yaml")``; a typo or a bad value fails at load time:

    >>> RunSettings.model_validate({"tree": {"kk": 8}})
    Traceback (most recent call last):
    ...
    seater_dist.settings.SettingsError: tree.kk: Extra inputs are not permitted

Models are values: a stage that changes a setting works on ``model_copy(update=...)``, never on the
caller's object. What every model shares (the base :class:`Settings`, :class:`SettingsError`, loading a file)
is in :mod:`seater_dist.settings`; both names are importable from here too.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from seater_dist.formats import FORMAT_NAMES, METRICS, PROTOCOL_KS, PROTOCOL_NAMES
from seater_dist.settings import Settings, SettingsError


def metric_cutoffs(protocol: str) -> tuple[int, ...]:
    """The K of every @K metric the protocol reports (the one definition: ``formats.PROTOCOL_KS``)."""
    return PROTOCOL_KS[protocol]


# --------------------------------------------------------------------------------------------
# data/
# --------------------------------------------------------------------------------------------

InputFormat = Literal[FORMAT_NAMES]  # type: ignore[valid-type]
Protocol = Literal[PROTOCOL_NAMES]  # type: ignore[valid-type]


class PrepareOptions(Settings):
    """How `seater prepare` filters and splits: the `prepare:` section of a run's config file.

    Example: ``PrepareOptions(min_user_count=5, min_item_count=5, k_core=True)``
    """

    min_user_count: int = Field(5, ge=1, description="Drop users with fewer interactions (after the item filter).")
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
    seed: int = Field(0, description="Seed of the comirec user shuffle.")
    split_ratio: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="comirec: shares of train / valid / test users."
    )
    history_fraction: float = Field(0.8, gt=0, lt=1, description="comirec: share of a valid/test sequence seen.")
    num_blocks: int = Field(0, ge=0, description="Ray Data partitions (0: choose from the input size).")


class PrepareSettings(PrepareOptions):
    """`seater prepare`: read raw logs, filter, re-index, split by protocol, write `dataset/`.

    Example: ``PrepareSettings(input="data/Beauty.txt", format="sequences", out="runs/beauty/dataset")``
    """

    input: str = Field(description="File or directory (local path or pyarrow.fs URI) of raw logs.")
    format: InputFormat = Field(description="Reader to use (seater_dist.formats.FORMATS).")
    out: str = Field(description="Output `dataset/` directory.")
    protocol: Protocol = Field("comirec", description="Evaluation protocol (seater_dist.formats.PROTOCOLS).")


SynthPreset = Literal["tiny", "small", "microvideo"]


class SynthSettings(Settings):
    """`seater synth`: interactions with planted structure (topic hierarchy, power-law popularity,
    drifting user interests), written as partitioned parquet by parallel Ray tasks.

    Example: ``SynthSettings(preset="small", out="runs/synth_small")``
    """

    preset: SynthPreset = Field("small", description="Size: tiny (tests), small (the demo), microvideo "
                                "(the paper's industrial shape: 0.75M users, 6.1M items, 85M interactions).")
    out: str = Field(description="Output directory of parquet parts.")
    seed: int = Field(0, description="Seed of the generator (same seed, same data).")
    num_users: int | None = Field(None, ge=1, description="Override the preset's user count.")
    num_items: int | None = Field(None, ge=1, description="Override the preset's item count.")
    num_interactions: int | None = Field(None, ge=1, description="Override the preset's interaction count.")
    num_partitions: int | None = Field(None, ge=1, description="Parquet files / Ray tasks.")


# --------------------------------------------------------------------------------------------
# tree/
# --------------------------------------------------------------------------------------------


class TreeSettings(Settings):
    """`seater build-tree`: the balanced k-ary item tree of docs/method.md §1.

    Example: ``TreeSettings(k=16)``; ``TreeSettings(k=8, kind="random")`` for the ablation.
    """

    k: int = Field(8, ge=2, description="Branching factor.")
    kind: Literal["balanced", "unbalanced", "random"] = Field(
        "balanced",
        description="balanced: constrained k-means (SEATER); unbalanced: plain k-means, recursing while "
        "a group exceeds k (ablation); random: random balanced splits (ablation).",
    )
    exact_threshold: int = Field(
        0, ge=0, description="Nodes with at most this many items are split by the reference solver "
        "k-means-constrained instead of our own exact constrained k-means (the same problem, solved more "
        "slowly); 0: never.",
    )
    large_node: int = Field(
        100_000, ge=2, description="Nodes with more items are split alone (faiss k-means + balanced "
        "Lloyd); smaller nodes are stacked and split together by the batched method.",
    )
    n_init: int = Field(
        3, ge=1, description="Restarts on every node, the best kept; nodes above 512 items run 5x as many on a "
        "512-item sample."
    )
    kmeans_iters: int = Field(
        3, ge=1, description="Unconstrained Lloyd iterations: faiss k-means on large nodes runs at least 20; on "
        "the others they give the unconstrained objective reported next to ours.",
    )
    balanced_iters: int = Field(
        10, ge=1, description="Lloyd iterations with the balanced assignment (a node stops once no item "
        "moves).",
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
        2, ge=0, description="Nodes per level also solved by the reference solver k-means-constrained, "
        "to report our objective against it (only nodes of at most quality_sample_max_items items).",
    )
    quality_sample_max_items: int = Field(
        2000, ge=2, description="Largest node (in items) that quality_sample_nodes picks."
    )
    seed: int = 0


# --------------------------------------------------------------------------------------------
# model/
# --------------------------------------------------------------------------------------------


class SeaterSettings(Settings):
    """The SEATER model and its losses (docs/method.md §2-§3, §5).

    Example: ``SeaterSettings(lambda_ali=0.05, lambda_rank=0.05, beam_size=50)``
    """

    d_model: int = Field(64, ge=8, description="d: width of embeddings and Transformer layers.")
    n_heads: int = Field(2, ge=1, description="Attention heads (must divide d_model).")
    ffn_dim: int = Field(256, ge=8, description="Feed-forward width of every Transformer layer.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout inside the encoder and decoder layers.")
    encoder_layers: int = Field(1, ge=1, le=12, description="Transformer encoder layers (the paper's main setting: 1).")
    decoder_layers: int = Field(1, ge=1, le=12, description="Transformer decoder layers (the paper's main setting: 1).")
    history_len: int = Field(20, ge=1, description="t: items of history the encoder reads.")
    use_alignment: bool = Field(True, description="L_ali (Eq. 6); off for the ablation.")
    use_ranking: bool = Field(True, description="L_rank (Eq. 7-8); off for the ablation.")
    lambda_ali: float = Field(0.05, ge=0, description="Weight of L_ali in the total loss (Eq. 9).")
    lambda_rank: float = Field(0.05, ge=0, description="Weight of L_rank in the total loss (Eq. 9).")
    tau: float = Field(0.2, gt=0, description="L_ali temperature.")
    beta: float = Field(0.001, ge=0, description="L_rank adaptive margin scale.")
    num_rank_negatives: int = Field(4, ge=1, description="q: negatives per positive identifier.")
    beam_size: int = Field(50, ge=1, description="b: beams kept at every step of the constrained beam search.")
    embedding_init_std: float = Field(
        0.125, gt=0, description="Std of the normal init of the token table AND of the position tables (one "
        "coherent scale; 0.125 = 1/sqrt(64)). The authors' code uses 1.0, which starts the constrained softmax "
        "saturated (docs/method.md §2).",
    )
    input_dropout: float = Field(0.3, ge=0, lt=1, description="Dropout on the encoder's and decoder's input "
                                 "embeddings (token + position), as SASRec has; 0 in both SEATER codebases (the "
                                 "faithful setting); 0.3 won on Beauty's validation users with the SASRec start "
                                 "(0.2 with the random start; docs/results.md).")
    token_init: Literal["random", "embeddings"] = Field(
        "embeddings", description="embeddings: item rows start from the item embeddings the tree was built "
        "from (the file its manifest records, or train --embeddings), internal nodes from their subtree means, "
        "all rescaled to std embedding_init_std; won on Beauty's validation users (docs/results.md). random: "
        "N(0, embedding_init_std^2), the paper's start.")

    def model_post_init(self, context: Any) -> None:
        if self.d_model % self.n_heads:
            raise SettingsError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


class SasrecSettings(Settings):
    """SASRec (docs/method.md §6): the tree's item embeddings and the dual-encoder baseline.

    Example: ``SasrecSettings(loss="sampled", num_negatives=1280)``
    """

    d_model: int = Field(64, ge=8, description="d: width of item embeddings and layers.")
    n_heads: int = Field(2, ge=1, description="Attention heads (must divide d_model).")
    num_blocks: int = Field(2, ge=1, le=12, description="Self-attention blocks.")
    ffn_dim: int | None = Field(None, ge=8, description="Feed-forward width (default d_model, as SASRec).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on the input embeddings and inside the blocks.")
    max_len: int = Field(50, ge=1, description="Longest training sequence (last items kept).")
    loss: Literal["sampled", "ce"] = Field("sampled", description="sampled softmax (paper) or full CE.")
    num_negatives: int = Field(1280, ge=1, description="Shared uniform negatives of the sampled softmax.")

    def model_post_init(self, context: Any) -> None:
        if self.d_model % self.n_heads:
            raise SettingsError(f"n_heads: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


# --------------------------------------------------------------------------------------------
# train/, eval/
# --------------------------------------------------------------------------------------------

_METRIC = re.compile(rf"^({'|'.join(METRICS)})@([1-9][0-9]*)$")


def metric_k(name: str) -> int:
    """The K of a metric name such as ``recall@50``; ValueError naming the choices otherwise."""
    match = _METRIC.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a metric: expected one of {', '.join(m + '@K' for m in METRICS)}, "
                         "e.g. recall@50")
    return int(match.group(2))


class TrainSettings(Settings):
    """Ray Train loop settings shared by SEATER (`seater train`) and SASRec (`seater embed`).

    Example: ``TrainSettings(workers=2, cpus_per_worker=0.5, epochs=30, batch_size=256)``
    """

    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel replicas).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per worker; leave CPUs to Ray Data (on a "
                                   "2-CPU machine two workers of 1.0 leave it none and training hangs).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU (gloo).")
    epochs: int = Field(50, ge=1, description="Most epochs to train.")
    batch_size: int = Field(256, ge=1, description="Global batch (split over workers).")
    shuffle_buffer: int = Field(4096, ge=1, description="Samples each worker shuffles locally before batching "
                                "(Ray Data's local shuffle buffer), on top of the per-epoch order of users.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(1e-5, ge=0, description="L2 penalty added to the gradient, as torch.optim.Adam does.")
    table_weight_decay: float | None = Field(
        None, ge=0, description="Weight decay of the big embedding table alone (None: weight_decay): coupled L2 "
        "with adam and lazy_adam, AdamW's decoupled decay with adamw (each step multiplies every row by "
        "1 - lr * table_weight_decay, a pull that Adam does not divide by the row's gradient scale as it divides "
        "coupled L2: the same number pulls far less). With adam, 0 "
        "catches untouched rows up in closed form and a step costs the rows it touches; L2 costs one pass over "
        "the table per step.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    patience: int = Field(5, ge=1, description="Epochs without validation improvement before stopping "
                          "(the authors' 5).")
    table_optimizer: Literal["adam", "adamw", "lazy_adam"] = Field(
        "adam", description="Optimiser of the big embedding table. adam: torch.optim.Adam semantics on every row "
        "(untouched rows still move by momentum and decay), the authors' coupled L2; a step costs the rows it "
        "touches without L2 on the table, one pass over the table with it. adamw: torch.optim.AdamW semantics on "
        "every row (decoupled decay), a step costs the rows it touches at any table_weight_decay. lazy_adam: "
        "row-sparse Adam, cost proportional to the rows a step touches, rarely seen rows move less.")
    select_metric: str = Field("recall@50", description="Validation metric that picks the best checkpoint "
                               "(recall@K, hr@K or ndcg@K with K among the protocol's cut-offs).")
    max_valid_users: int | None = Field(None, ge=1, description="Validate on at most this many users.")
    max_failures: int = Field(2, ge=0, description="Worker failures to recover from (Ray Train).")
    storage_path: str | None = Field(None, description="Ray Train storage (local path or URI); default "
                                     "OUT/ray_results.")
    seed: int = Field(0, description="Seed of initialisation, sampling and shuffling.")

    @field_validator("select_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        metric_k(value)
        return value


class EvalSettings(Settings):
    """`seater evaluate`: offline metrics by Ray Data batch inference (an actor pool, each actor loading
    the checkpoint once).

    Example: ``EvalSettings(concurrency=2, cpus_per_actor=0.5)``
    """

    batch_size: int = Field(256, ge=1, description="Users per batch an actor ranks at once.")
    max_users: int | None = Field(None, ge=1, description="Evaluate at most this many users (the first ones).")
    concurrency: int = Field(2, ge=1, description="Most actors in the pool.")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs reserved per actor (its torch threads: "
                                  "max(1, round(cpus_per_actor))).")
    use_gpu: bool = Field(False, description="One GPU per actor.")


class RunSettings(Settings):
    """`seater run`: every stage's settings in one file (each section optional)."""

    prepare: PrepareOptions = Field(default_factory=PrepareOptions, description="`seater prepare` options "
                                    "(input, format, protocol and out come from the command line).")
    tree: TreeSettings = Field(default_factory=TreeSettings, description="`seater build-tree`.")
    seater: SeaterSettings = Field(default_factory=SeaterSettings, description="The SEATER model and losses.")
    sasrec: SasrecSettings = Field(default_factory=SasrecSettings, description="The SASRec model.")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Training SEATER (`seater train`).")
    sasrec_train: TrainSettings = Field(default_factory=TrainSettings, description="Training SASRec "
                                        "(`seater embed`).")
    eval: EvalSettings = Field(default_factory=EvalSettings, description="`seater evaluate`.")


class ServeArgs(Settings):
    """The application's arguments (``args:`` of a Serve config, ``key=value`` after ``serve run``)."""

    checkpoint: str = Field(description="SEATER or SASRec checkpoint directory, or a pyarrow.fs URI (s3://...).")
    shards: int = Field(1, ge=1, description="Search shards: SEATER splits the root's children (at most k), "
                        "SASRec the items.")
    beam_size: int | None = Field(None, ge=1, description="SEATER: beam (default: the checkpoint's); SASRec: the "
                                  "largest top_n (default 50).")
    popularity: str | None = Field(None, description="Dataset directory or items.parquet with counts for the "
                                   "popular fallback (default: the run's dataset beside the checkpoint if its "
                                   "items match, else the model's answer to an empty history).")
    index: Literal["flat", "hnsw"] = Field("flat", description="SASRec: exact IndexFlatIP or HNSW.")
    hnsw_m: int = Field(16, ge=4, description="SASRec HNSW: links per node.")
    ef_construction: int = Field(40, ge=8, description="SASRec HNSW: candidates while building.")
    ef_search: int = Field(128, ge=1, description="SASRec HNSW: candidates per query (recall vs speed).")
    index_cache: str | None = Field(None, description="SASRec HNSW: directory where built indexes are kept and "
                                    "reused (keyed by model version, shard and parameters).")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Larger request bodies get 413.")
    threads: int = Field(1, ge=1, description="torch/faiss threads per replica.")
    gpu: bool | None = Field(None, description="Place encoder and shards on GPUs (default: if the cluster has any).")
    min_replicas: int = Field(1, ge=1, description="Replicas every deployment starts with and keeps (warm "
                              "capacity: a new replica takes as long as loading the checkpoint to start).")
    max_replicas: int = Field(2, ge=1, description="Autoscaling ceiling of every deployment.")
    retry_timeout_s: float = Field(30.0, gt=0, description="How long the router retries a request whose replica "
                                   "died or changed version before answering 503.")
    batch_size: int = Field(16, ge=1, description="Most requests one encoder/shard batch holds.")
    serial_load: bool = Field(True, description="Replicas on one machine load the checkpoint one at a time "
                              "(bounds the peak memory of a deployment; slower to start).")
    layout: Literal["split", "single"] = Field("split", description="split: a Router, an Encoder and S shard "
                                               "deployments, each scaled on its own; single: one deployment whose "
                                               "replicas hold the encoder and every shard (no calls between "
                                               "deployments: less CPU and latency per request; scales as a whole).")

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


def parse_serve_args(args: dict[str, Any]) -> ServeArgs:
    """``args`` checked -> ServeArgs; else a SettingsError naming the bad fields in one line ("serve args: ...")."""
    try:
        return ServeArgs.model_validate(args)
    except SettingsError as err:
        raise SettingsError(f"serve args: {err}") from None
