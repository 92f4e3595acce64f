"""SEATER model, losses, constrained beam search, retriever; SASRec. Plain PyTorch, no Ray.

* ``seater.SeaterModel(tree, settings, sparse_embedding=False, trainable=True)``: ``forward(history, target)`` ->
  {"loss", "gen", "ali", "rank"}; ``encode``; ``beam_search(history, beam_size, top_n)``;
  ``item_log_probs(history, items)`` (Eq. 1 in log space); ``topk(histories, top_k)`` (retrieval).
* ``losses``: L_gen, L_ali (paper's exclusion rule), L_rank and its exact-prefix negative sampler.
* ``beam_search.beam_search``: batched over users and beams, key/value cache, encoder once per user.
* ``sasrec.SASRec(num_items, settings)``: ``loss``, ``user_state``, ``topk(histories, top_k)`` (exact
  inner-product search: torch.topk on a GPU, faiss IndexFlatIP built once per table on a CPU).
* ``checkpoint.save_checkpoint`` / ``load_checkpoint``: the one checkpoint format of both models;
  ``load_checkpoint(path).topk(histories, top_k)`` ranks with either.
* ``retriever.SeaterRetriever.from_checkpoint(path).recommend(histories, top_n)``: raw ids in and out.

Histories are int64 [B, t], oldest first, LEFT-padded with the tree's PAD token (SASRec: with num_items).
"""
