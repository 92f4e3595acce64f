"""Serving retrieval over HTTP with Ray Serve (docs/architecture.md, "Serving").

* ``request``: the HTTP contract (validation, error bodies), pure functions.
* ``merge``: the messages between replicas and the merge of the shards' answers (numpy only), with
  ``sharded_search``, the one driver of the sharded beam search (run in-process and by the router).
* ``seater_parts``, ``sasrec_parts``: what each replica holds and computes (torch, faiss; no Ray):
  ``SeaterEncoderPart``, ``BeamShardPart``, ``SasrecEncoderPart``, ``IndexShardPart``, and ``ShardedSeater``,
  the whole sharded search in one process; ``lookup``: raw ids -> item indices, the popular items.
* ``replicas``: the deployments that hold a part (``Encoder``, ``BeamShard``, ``IndexShard``); ``router``: the
  HTTP ingress ``Router``.
* ``app``: the application builder ``build_app``, composing the deployments (``Router``, ``Encoder``,
  ``BeamShard<s>`` / ``IndexShard<s>``), that ``serve run``, ``serve deploy`` (serve/*.yaml) and ``seater serve``
  use.

Modules are imported on use: ``seater_dist.serve`` itself imports nothing heavy.
"""
