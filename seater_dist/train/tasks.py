"""What differs between training SEATER and SASRec, behind one small interface the Ray Train loop uses.

A task knows how to build its model, turn stored sequences into training batches (on the Ray Data
side, streaming), compute the loss of a batch, and write a self-contained checkpoint (validation ranks
items with the model's own ``topk``). The loop (loop.py) owns everything else: DDP, the sparse table, epochs,
validation, early stopping, checkpoints and fault tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from seater_dist.artifacts import local_copy
from seater_dist.config import SasrecSettings, SeaterSettings, SettingsError, TrainSettings
from seater_dist.data.dataset import load_dataset
from seater_dist.data.samples import expand_next_item, shifted_sequences
from seater_dist.files import load_npy
from seater_dist.model.checkpoint import save_checkpoint


class Task(Protocol):
    name: str
    table_name: str  # the big embedding table, kept out of DDP
    has_unused_parameters: bool  # some parameter gets no gradient (an ablation switched a loss off)

    def build_model(self) -> nn.Module: ...

    def batch_fn(self): ...  # Ray Data map_batches function: pyarrow batch of sequences -> numpy samples

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def save(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None: ...


def _items_column(batch: Any):
    return batch["items"]


class _Checkpointing:
    """Writes the task's model in the one checkpoint format, with the dataset's raw item ids."""

    dataset_path: str
    _item_ids: np.ndarray | None = None

    def item_ids(self) -> np.ndarray:
        if self._item_ids is None:  # read once: millions of raw ids at Micro-Video scale
            self._item_ids = load_dataset(self.dataset_path).item_ids
        return self._item_ids


class SeaterTask(_Checkpointing):
    """SEATER (docs/method.md §2-§5) on a prepared dataset and a built tree."""

    name = "seater"
    table_name = "tok_emb"

    @property
    def has_unused_parameters(self) -> bool:
        """W_s learns only through L_rank: without it DDP must look for unused parameters."""
        return not self.settings.use_ranking

    def __init__(self, tree_path: str, dataset_path: str, settings: SeaterSettings,
                 embeddings_path: str | None = None) -> None:
        from seater_dist.tree import ItemTree

        self.tree_path = tree_path
        self.dataset_path = dataset_path
        self.settings = settings
        self.tree = ItemTree.load(tree_path)
        self.embeddings_path = embeddings_path

    def build_model(self) -> nn.Module:
        from seater_dist.model.seater import SeaterModel

        model = SeaterModel(self.tree, self.settings, sparse_embedding=True)
        if self.settings.token_init == "embeddings":
            table = load_npy(local_copy(self.embeddings_path), SettingsError, "a .npy array of item embeddings [N, d]")
            model.init_tokens_from(self.tree, table)
        return model

    def batch_fn(self):
        t, pad = self.settings.history_len, self.tree.pad

        def expand(batch):
            return expand_next_item(_items_column(batch), t, pad)

        return expand

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch["history"], batch["target"])

    def save(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        save_checkpoint(path, model, self.settings, self.item_ids(), tree=self.tree, extra=extra)


class SasrecTask(_Checkpointing):
    """SASRec (docs/method.md §6): the tree's item embeddings and the dual-encoder baseline."""

    name = "sasrec"
    table_name = "item_emb"
    has_unused_parameters = False

    def __init__(self, num_items: int, dataset_path: str, settings: SasrecSettings) -> None:
        self.num_items = num_items
        self.dataset_path = dataset_path
        self.settings = settings

    def build_model(self) -> nn.Module:
        from seater_dist.model.sasrec import SASRec

        model = SASRec(self.num_items, self.settings)
        # The sampled softmax touches a few thousand rows a step: let its gradient be row-sparse.
        model.item_emb.sparse = self.settings.loss == "sampled"
        return model

    def batch_fn(self):
        max_len, pad = self.settings.max_len, self.num_items

        def shift(batch):
            return shifted_sequences(_items_column(batch), max_len, pad)

        return shift

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": model.loss(batch["seq"], batch["pos"])}

    def save(self, model: nn.Module, path: Path, extra: dict[str, Any]) -> None:
        save_checkpoint(path, model, self.settings, self.item_ids(), extra=extra)


class LossModule(nn.Module):
    """Runs a task's loss inside ``forward`` so that DDP (which hooks ``forward``) syncs its gradients.

    The wrapped model is ``self.model``; its big table is then ``model.<table_name>``.
    """

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.task.losses(self.model, batch)


class WorkerSpec(BaseModel):
    """Everything the driver hands each Train worker (Ray Train's ``train_loop_config`` carries it as JSON).

    The driver fills it in stages: the task and its model settings (train_seater / train_sasrec), the checked
    embeddings file (after the tree's checks), then the dataset, training settings and metric cut-offs."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["seater", "sasrec"]
    seater: SeaterSettings | None = Field(None, description="task seater: the model and losses.")
    sasrec: SasrecSettings | None = Field(None, description="task sasrec: the model.")
    tree_path: str | None = Field(None, description="task seater: the tree (absolute path or URI).")
    embeddings_path: str | None = Field(None, description="task seater, token_init embeddings: the checked file.")
    num_items: int | None = Field(None, description="task sasrec: the catalogue's size.")
    dataset_path: str = Field("", description="The prepared dataset (absolute path or URI).")
    train: TrainSettings = Field(default_factory=TrainSettings)
    ks: tuple[int, ...] = Field((), description="The protocol's metric cut-offs.")
    threads_per_worker: int = Field(1, ge=1, description="torch threads in each worker.")
    verbose: bool = Field(False, description="SEATER_VERBOSE on the driver: keep Ray Train's own reports.")


def make_task(spec: WorkerSpec) -> Task:
    """The task a worker trains, from its spec."""
    if spec.task == "seater":
        return SeaterTask(spec.tree_path, spec.dataset_path, spec.seater, spec.embeddings_path)
    return SasrecTask(spec.num_items, spec.dataset_path, spec.sasrec)
