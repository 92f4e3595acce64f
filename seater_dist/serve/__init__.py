"""Serving retrieval over HTTP with Ray Serve (docs/architecture.md, "Serving").

* ``request``: the HTTP contract (validation, error bodies), pure functions.
* ``merge``: the messages between replicas and the merge of the shards' answers (numpy only).
* ``parts``: what each replica holds and computes (torch, faiss; no Ray): ``SeaterEncoderPart``,
  ``BeamShardPart``, ``SasrecEncoderPart``, ``IndexShardPart``, and ``ShardedSeater``, the whole sharded
  search in one process.
* ``app``: the Serve deployments (``Router``, ``Encoder``, ``BeamShard<s>`` / ``IndexShard<s>``) and the
  application builder ``build_app`` that ``serve run``, ``serve deploy`` (serve/*.yaml) and ``seater serve``
  use.

Modules are imported on use: ``seater_dist.serve`` itself imports nothing heavy.
"""
