"""SEATER (Si et al., SIGIR-AP 2024): generative retrieval over a balanced k-ary item tree.

Reads like the paper's Section 3 (docs/method.md §2-§3, §5):

* one token table E (items are the leaf tokens; BOS = root, PAD, internal nodes), tokens and positions
  initialised at one scale (embedding_init_std);
* encoder over the user's last t items (Eq. 2), decoder over the identifier [BOS, y1, ..., y_{D-1}] (Eq. 3);
* the constrained softmax (Eq. 4): logits are the decoder state against the embeddings of the previous
  token's children only (<= k rows), never the vocabulary;
* the item score is the sum of constrained log-probabilities along its path (log of Eq. 1);
* training loss L_gen + λa·L_ali + λr·L_rank (Eq. 9), each term switchable for the ablations.

Every training-time use of E is a lookup ``self.tok_emb(index)`` so that ``sparse_embedding=True`` gives a
row-sparse gradient touching only the rows a batch uses.

Example::

    tree = ItemTree.from_paths(np.array([[0], [0], [1], [1]]), k=2)
    model = SeaterModel(tree, SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5))
    history = torch.tensor([[tree.pad, tree.pad, 0, 2, 1]])          # left-padded, oldest first
    losses = model(history, torch.tensor([3]))                        # {"loss", "gen", "ali", "rank"}
    items, scores = model.beam_search(history, beam_size=4, top_n=2)  # [1, 2] each
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from seater_dist.config import SeaterSettings
from seater_dist.data.samples import left_pad
from seater_dist.model import losses
from seater_dist.model.beam_search import beam_search
from seater_dist.model.layers import DecoderLayer, EncoderLayer, KVCache
from seater_dist.tree.item_tree import ItemTree


class SeaterModel(nn.Module):
    """Encoder-decoder over tree identifiers with a shared token table (docs/method.md §2).

    Args:
        tree: the item tree (its arrays become non-persistent buffers).
        settings: sizes, loss switches and weights.
        sparse_embedding: make ``tok_emb`` produce sparse (row) gradients.
        trainable: build the L_rank negative sampler (``forward``); False for a model that only ranks
            (a loaded checkpoint), which then starts faster at millions of items.
    """

    def __init__(self, tree: ItemTree, settings: SeaterSettings, sparse_embedding: bool = False,
                 trainable: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self.num_items, self.k, self.depth = tree.num_items, tree.k, tree.depth
        self.bos, self.pad = tree.bos, tree.pad
        d = settings.d_model
        self.tok_emb = nn.Embedding(tree.num_tokens, d, sparse=sparse_embedding)
        self.enc_pos = nn.Embedding(settings.history_len, d)
        self.dec_pos = nn.Embedding(tree.depth, d)
        for table in (self.tok_emb, self.enc_pos, self.dec_pos):  # one scale for tokens and positions
            nn.init.normal_(table.weight, 0.0, settings.embedding_init_std)
        self.input_drop = nn.Dropout(settings.input_dropout)
        layer_args = (d, settings.n_heads, settings.ffn_dim, settings.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(settings.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(settings.decoder_layers))
        self.w_s = nn.Parameter(nn.init.xavier_normal_(torch.empty(d, d)))  # Eq. 8 similarity (authors' init)
        self._register_tree(tree)
        self.rank_sampler = losses.PrefixNegativeSampler(tree) if trainable else None
        # The tree buffers are identical on every worker and hundreds of MB at millions of items: DDP must not
        # broadcast them every step (it reads this attribute when it wraps the module).
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]

    def init_tokens_from(self, tree: ItemTree, item_emb: np.ndarray) -> None:
        """Start the token table from item embeddings [N, d]: items their own rows, internal nodes and BOS
        their subtree means (ItemTree.subtree_means), rescaled so the item rows' std is embedding_init_std."""
        table = tree.subtree_means(item_emb)
        if table.shape[1] != self.settings.d_model:
            raise ValueError(f"item embeddings have d = {table.shape[1]}, the model d_model = {self.settings.d_model}")
        scale = self.settings.embedding_init_std / max(float(table[: self.num_items].std()), 1e-12)
        with torch.no_grad():
            self.tok_emb.weight.copy_(torch.from_numpy(table * scale))

    def _register_tree(self, tree: ItemTree) -> None:
        # child_table[r] = children of token N + r, with -1 replaced by PAD (PAD is never a real child), so a
        # lookup never leaves the table and "no child" is simply `== pad`.
        children = np.where(tree.children < 0, tree.pad, tree.children).astype(np.int64)
        self.register_buffer("child_table", torch.from_numpy(children), persistent=False)
        codes = np.ascontiguousarray(tree.codes, dtype=np.int32)
        self.register_buffer("item_codes", torch.from_numpy(codes), persistent=False)
        self.register_buffer("token_parent", torch.from_numpy(tree.parent.astype(np.int32)), persistent=False)
        self.register_buffer("token_level", torch.from_numpy(tree.level.astype(np.int32)), persistent=False)

    # ------------------------------------------------------------------ encoder (Eq. 2)
    def encode(self, history: Tensor) -> tuple[Tensor, Tensor]:
        """history int [B, t'] left-padded with PAD, oldest first -> (memory [B, t', d], key_padding_mask [B, t']).

        The mask is True at padding. Histories longer than t keep their last t items; shorter ones take the
        last t' positions, so the latest item always sits at position t-1. A history with no item at all
        unmasks its last position (the PAD token), so every user gets a defined representation.
        """
        t = self.settings.history_len
        history = history[:, -t:]
        B, length = history.shape
        if history.device.type == "cpu":  # on a GPU a check costs a sync: checked on the host before the copy
            self.check_history(history)
        pad_mask = history == self.pad
        pad_mask[:, -1] &= ~pad_mask.all(dim=1)
        positions = torch.arange(t - length, t, device=history.device)
        x = self.input_drop(self.tok_emb(history) + self.enc_pos(positions))
        bias = self._key_bias(pad_mask)
        for layer in self.encoder:
            x = layer(x, bias)
        return x, pad_mask

    def check_history(self, history: Tensor) -> None:
        """ValueError unless every token of history [B, t] is an item id 0..N-1 or PAD."""
        bad = (history < 0) | ((history >= self.num_items) & (history != self.pad))
        if bool(bad.any()):
            raise ValueError(
                f"history holds token {int(history[bad][0])}: "
                f"expected item ids 0..{self.num_items - 1} or PAD={self.pad}"
            )

    def _key_bias(self, pad_mask: Tensor) -> Tensor:
        """[B, t] True-at-padding -> additive bias [B, 1, 1, t] (in the model's float type)."""
        bias = torch.zeros(pad_mask.shape, dtype=self.tok_emb.weight.dtype, device=pad_mask.device)
        return bias.masked_fill(pad_mask, float("-inf"))[:, None, None, :]

    # ------------------------------------------------------------------ decoder (Eq. 3)
    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every decoder layer, computed once per user: [(k, v) [B, h, t, hd]]."""
        return [layer.memory_kv(memory) for layer in self.decoder]

    def decode(
        self,
        tokens: Tensor,
        mem_kv: list[tuple[Tensor, Tensor]],
        pad_mask: Tensor,
        caches: list[KVCache] | None = None,
        start: int = 0,
    ) -> Tensor:
        """Decoder states of input tokens [B, G, L] (G identifiers or beams per user) -> [B, G, L, d].

        Teacher-forced when ``caches`` is None (tokens = [BOS, y1, ..., y_{D-1}], causal mask); with caches,
        the L tokens sit at positions start..start+L-1 after the cached ones (incremental decoding).
        """
        L = tokens.shape[-1]
        positions = torch.arange(start, start + L, device=tokens.device)
        x = self.input_drop(self.tok_emb(tokens) + self.dec_pos(positions))
        bias = self._key_bias(pad_mask)
        for i, layer in enumerate(self.decoder):
            k, v = mem_kv[i]
            x = layer(x, k, v, bias, None if caches is None else caches[i])
        return x

    # ------------------------------------------------------------------ constrained softmax (Eq. 4)
    def children_of(self, tokens: Tensor) -> Tensor:
        """Children tokens of BOS/internal/PAD tokens [...] -> [..., k] (PAD where there is no child)."""
        return self.child_table[tokens - self.num_items]

    def constrained_log_probs(self, states: Tensor, prev_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 4 as log-probabilities. states [..., d], prev_tokens [...] -> (log_probs [..., k], children [..., k]).

        Logits = state · e_c for the children c of the previous token only; missing children get -inf; a token
        without children (PAD, a dead beam) gets -inf everywhere instead of NaN.
        """
        children = self.children_of(prev_tokens)
        valid = children != self.pad
        logits = torch.einsum("...d,...kd->...k", states, self.tok_emb(children))
        logits = logits.masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        return torch.where(valid, logits - lse, torch.full_like(logits, float("-inf"))), children

    def identifiers(self, items: Tensor) -> Tensor:
        """Item ids [...] -> their token paths [..., D] (int64)."""
        return self.item_codes[items].long()

    def decoder_inputs(self, ids: Tensor) -> Tensor:
        """Identifiers [..., D] -> teacher-forcing inputs [BOS, y1, ..., y_{D-1}] [..., D]."""
        bos = torch.full_like(ids[..., :1], self.bos)
        return torch.cat([bos, ids[..., :-1]], dim=-1)

    def item_log_probs(self, history: Tensor, items: Tensor) -> Tensor:
        """log of Eq. 1 for given items: history [B, t], items [B, M] -> [B, M] (sum of constrained log-probs)."""
        memory, pad_mask = self.encode(history)
        ids = self.identifiers(items)  # [B, M, D]
        inputs = self.decoder_inputs(ids)
        states = self.decode(inputs, self.memory_kv(memory), pad_mask)
        log_probs, children = self.constrained_log_probs(states, inputs)
        return log_probs.masked_fill(children != ids.unsqueeze(-1), 0.0).sum((-1, -2))

    # ------------------------------------------------------------------ training (Eq. 5-9)
    def forward(self, history: Tensor, target: Tensor) -> dict[str, Tensor]:
        """history int [B, t] (left-padded), target int [B] item ids -> {"loss", "gen", "ali", "rank"} scalars.

        The ids are checked on a CPU; on a GPU a check would cost a host sync every step, and the training
        batches hold the dataset's item indices, checked when it was prepared."""
        s = self.settings
        if target.device.type == "cpu" and bool(((target < 0) | (target >= self.num_items)).any()):
            raise ValueError(f"target holds ids outside 0..{self.num_items - 1}")
        memory, pad_mask = self.encode(history)
        ids = self.identifiers(target)[:, None, :]  # [B, 1, D]
        if s.use_ranking:
            if self.rank_sampler is None:
                raise RuntimeError("this SeaterModel was built with trainable=False: it ranks but cannot train")
            negatives, shared, valid = self.rank_sampler(ids[:, 0], s.num_rank_negatives)
            ids = torch.cat([ids, self.identifiers(negatives)], dim=1)  # [B, 1+q', D]: positive first
        inputs = self.decoder_inputs(ids)
        states = self.decode(inputs, self.memory_kv(memory), pad_mask)  # [B, G, D, d]
        log_probs, children = self.constrained_log_probs(states[:, 0], inputs[:, 0])
        zero = states.new_zeros(())
        out = {"gen": losses.generation_loss(log_probs, children, ids[:, 0]), "ali": zero, "rank": zero}
        if s.use_alignment:
            out["ali"] = self._alignment(ids[:, 0])
        if s.use_ranking:
            z_x = self._mean_memory(memory, pad_mask)
            scores = losses.bilinear_similarity(z_x, states.mean(dim=2), self.w_s)  # Eq. 7: mean over D
            all_shared = torch.cat([torch.full_like(shared[:, :1], self.depth), shared], dim=1)
            all_valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
            out["rank"] = losses.ranking_loss(scores, all_shared, all_valid, s.beta)
        out["loss"] = out["gen"] + s.lambda_ali * out["ali"] + s.lambda_rank * out["rank"]
        return out

    def _alignment(self, ids: Tensor) -> Tensor:
        """L_ali over the distinct tokens of the batch's target identifiers ids [B, D]."""
        tokens = torch.unique(ids)
        parents = self.token_parent[tokens].long()
        return losses.alignment_loss(tokens, parents, self.tok_emb(tokens), self.tok_emb(parents), self.settings.tau)

    @staticmethod
    def _mean_memory(memory: Tensor, pad_mask: Tensor) -> Tensor:
        """z_x of Eq. 7: mean of encoder states over real positions. [B, t, d], [B, t] -> [B, d]"""
        keep = (~pad_mask).unsqueeze(-1).to(memory.dtype)
        return (memory * keep).sum(1) / keep.sum(1)

    # ------------------------------------------------------------------ inference (§5)
    def beam_search(self, history: Tensor, beam_size: int, top_n: int) -> tuple[Tensor, Tensor]:
        """Constrained beam search: history [B, t] -> (items int64 [B, top_n], scores float [B, top_n]).

        Scores are sums of log-probabilities, best first; -1 / -inf pad when fewer leaves are reachable.
        Runs in eval mode without gradients (the module's mode is restored afterwards).
        """
        return beam_search(self, history, beam_size, top_n)

    def topk(self, histories: Sequence[Sequence[int]], top_k: int) -> np.ndarray:
        """The retrieval interface shared with SASRec: U item-index histories (oldest first, any length)
        -> int64 [U, top_k] best first, -1 padded. Beam search with the settings' beam (at least top_k)."""
        history = torch.from_numpy(left_pad(histories, self.settings.history_len, self.pad))
        self.check_history(history)
        items, _ = self.beam_search(history.to(self.tok_emb.weight.device),
                                    max(self.settings.beam_size, top_k), top_k)
        return items.cpu().numpy()
