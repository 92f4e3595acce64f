"""Serving (seater_dist.serve): the sharded search is the single-process search; the HTTP contract; a
replica killed under load is replaced; a rollout fails no request; the Serve config files (the KubeRay
RayService: tests/test_cluster_manifests.py).

The pure tests need no Ray. The HTTP tests share one Serve on 127.0.0.1 (the session's Ray, a free port),
started by the ``service`` fixture and shut down (Serve only, never Ray) at the end of the module.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from bench.synthetic import random_balanced_tree
from seater_dist.config import SasrecSettings, SeaterSettings, ServeArgs
from seater_dist.model.checkpoint import load_checkpoint, save_checkpoint
from seater_dist.model.retriever import SeaterRetriever
from seater_dist.model.sasrec import SASRec, topk_inner_product
from seater_dist.model.seater import SeaterModel
from seater_dist.serve.app import build_app, deployment_names
from seater_dist.serve.merge import merge_top
from seater_dist.serve.request import RequestError, parse_recommend
from seater_dist.serve.sasrec_parts import IndexShardPart, SasrecEncoderPart
from seater_dist.serve.seater_parts import ShardedSeater, shard_roots, sharded_beam_search

ROOT = Path(__file__).resolve().parents[1]
N, K, BEAM, T = 300, 4, 50, 6  # D = 5


def _ids(n: int) -> np.ndarray:
    return np.array([f"sku-{i:04d}" for i in range(n)], dtype=object)


def _seater(path: Path, seed: int, beam: int = BEAM, std: float = 1.0, n: int = N, k: int = K) -> Path:
    torch.manual_seed(seed)
    tree = random_balanced_tree(n, k, seed=0)
    settings = SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=T, beam_size=beam,
                              embedding_init_std=std)
    return save_checkpoint(path, SeaterModel(tree, settings), settings, _ids(n), tree=tree)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A `seater run` layout: dataset/items.parquet (with counts), seater/best, sasrec/best; and a second
    SEATER checkpoint (other weights, same catalogue) for the rollout."""
    root = tmp_path_factory.mktemp("run")
    counts = np.random.default_rng(0).integers(1, 1000, N)
    (root / "dataset").mkdir()
    pq.write_table(pa.table({"item_index": np.arange(N), "item_id": _ids(N).astype(str), "count": counts}),
                   root / "dataset" / "items.parquet")
    _seater(root / "seater" / "best", seed=0)
    _seater(root / "v2" / "seater" / "best", seed=1)
    torch.manual_seed(2)
    s = SasrecSettings(d_model=16, n_heads=2, num_blocks=1, max_len=T)
    save_checkpoint(root / "sasrec" / "best", SASRec(N, s), s, _ids(N))
    return root


def _histories(n_users: int, seed: int = 1) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"sku-{j:04d}" for j in rng.integers(0, N, rng.integers(1, 12))] for _ in range(n_users)]


# ------------------------------------------------------------------------------------------ pure: exactness


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_full_width_beam_sharded_search_is_the_single_process_ranking(run_dir, shards):
    ckpt = load_checkpoint(run_dir / "seater" / "best")
    model = load_checkpoint(run_dir / "seater" / "best").model
    sharded = ShardedSeater(ckpt, shards, beam_size=N)  # a beam covering every leaf: exhaustive
    history = torch.randint(0, N, (8, T), generator=torch.Generator().manual_seed(shards))
    items, scores = model.beam_search(history, N, N)
    memory, pad_mask = sharded.encoder.model.encode(history)
    for u in range(history.shape[0]):
        got, got_scores, raw, _ = sharded_beam_search(sharded.shards, memory[u].detach().numpy(),
                                                      pad_mask[u].numpy(), N, N)
        assert got.tolist() == items[u].tolist()
        np.testing.assert_allclose(got_scores, scores[u].numpy(), rtol=2e-6, atol=1e-5)  # float32 sums, another order
        assert raw == [f"sku-{i:04d}" for i in got]


@pytest.mark.parametrize("shards", [2, 4])
def test_b50_merged_shards_hold_every_single_process_item_and_rank_them_as_one_process(run_dir, shards):
    path = run_dir / "seater" / "best"
    reference = SeaterRetriever.from_checkpoint(path).recommend(_histories(40), top_n=BEAM)
    got = ShardedSeater(load_checkpoint(path), shards).recommend(_histories(40), top_n=BEAM)
    for ref, ours in zip(reference, got):
        assert set(ref["items"]) <= set(ours["items"])  # every single-process item is in the merged answer
        assert ours["items"] == ref["items"]
        assert all(a >= b - 1e-5 for a, b in zip(ours["scores"], ref["scores"]))  # as good, position by position
        assert ours["ignored"] == ref["ignored"]


def test_merge_recovers_what_independent_shard_beams_lose(tmp_path):
    """Each shard keeping only its own best b at the last level loses items of the single-process beam (a
    shard's beam also holds nodes that lost the global competition, and their children push global ones
    out). The merge replays the global beam over every node the shards expanded, asking a shard for the
    children of a global-beam node it did not keep: the result is the single-process beam, always."""
    beam, n, k = 8, 1000, 4
    path = _seater(tmp_path / "flat", seed=1, beam=beam, std=0.3, n=n, k=k)  # flat softmaxes: many close calls
    model = load_checkpoint(path).model
    sharded = ShardedSeater(load_checkpoint(path), 2)
    history = torch.randint(0, n, (300, T), generator=torch.Generator().manual_seed(2))
    history[:150, :3] = model.pad
    items, _ = model.beam_search(history, beam, beam)
    memory, pad_mask = sharded.encoder.model.encode(history)
    memory, pad_mask = memory.detach().numpy(), pad_mask.numpy()
    answers = [s.search(memory, pad_mask, beam) for s in sharded.shards]
    lost, expanded = 0, 0
    for u in range(history.shape[0]):
        own_beams = set()
        for shard_answers in answers:
            children, scores = shard_answers[u].children[-1].ravel(), shard_answers[u].scores[-1].ravel()
            best = np.argsort(-scores, kind="stable")[:beam]
            own_beams |= set(children[best][np.isfinite(scores[best])].tolist())
        lost += not set(items[u].tolist()) <= own_beams
        got, _, _, extra = sharded_beam_search(sharded.shards, memory[u], pad_mask[u], beam, beam)
        expanded += extra
        assert got.tolist() == items[u].tolist()
    print(f"\n{lost} of {history.shape[0]} users lose an item with independent shard beams; "
          f"{expanded} nodes expanded on request")
    assert lost > 0, "this seed was chosen to show the loss"
    assert expanded > 0, "this seed was chosen to exercise the second round trip"


def _bare(deployment, **state):
    """An instance of a deployment's class holding ``state``, no constructor run (no Serve replica starts).
    Without the async ``__del__`` of Serve's ingress wrapper, which only a replica awaits."""
    cls = deployment.func_or_class
    obj = object.__new__(type(cls.__name__, (cls,), {"__del__": lambda self: None}))
    obj.__dict__.update(state)
    return obj


def _router_in_process(sharded: ShardedSeater):
    """The Router of the single layout around ``sharded``'s encoder and shard parts, called as a replica calls
    them (``_Local`` wrappers of the Encoder and BeamShard deployments), built without Serve."""
    from seater_dist.serve.replicas import BeamShard, Encoder
    from seater_dist.serve.router import Router, _Local

    shards = [_Local(_bare(BeamShard, part=part, version=part.version)) for part in sharded.shards]
    return _bare(Router, encoder=_Local(_bare(Encoder, part=sharded.encoder)), shards=shards, kind="seater",
                 _info=None)


def test_router_and_in_process_search_go_through_one_merge_driver(tmp_path, monkeypatch):
    """The router's fan-out over the shard deployments and the in-process ShardedSeater both run
    merge.sharded_search: the same items, scores and second round trips, a patched driver is seen by both, and
    a shard of another model version makes the router retry."""
    import asyncio

    from seater_dist.serve import merge
    from seater_dist.serve.router import _Retry

    path = _seater(tmp_path / "flat", seed=1, beam=8, std=0.3, n=1000, k=4)  # many second round trips
    sharded = ShardedSeater(load_checkpoint(path), 2)
    router = _router_in_process(sharded)
    calls = {"users": 0}
    driver = merge.sharded_search

    def counted(memory, *args, **kwargs):
        calls["users"] += len(memory)
        return driver(memory, *args, **kwargs)

    monkeypatch.setattr(merge, "sharded_search", counted)
    rng = np.random.default_rng(4)
    histories = [[f"sku-{j:04d}" for j in rng.integers(0, 1000, rng.integers(1, 6))] for _ in range(40)]
    expanded = 0
    for history in histories:
        before = sharded.expansions
        (ours,) = sharded.recommend([history], top_n=8)
        ((body, headers),) = asyncio.run(router._answer_once([(history, 8)]))
        assert body["items"] == ours["items"]
        np.testing.assert_allclose(body["scores"], ours["scores"], rtol=2e-6, atol=1e-5)  # the router's threads
        assert int(headers["X-Seater-Expanded"]) == sharded.expansions - before
        expanded += sharded.expansions - before
    assert calls["users"] == 2 * len(histories)  # every user, once by each path
    assert expanded > 0, "these users were chosen to exercise the second round trip"
    router.shards[1]._target.version = "another-version"
    with pytest.raises(_Retry):
        asyncio.run(router._answer_once([(histories[0], 8)]))


def test_single_layout_with_one_shard_keeps_one_copy_of_the_token_table(run_dir):
    """The encoder reads its item rows from the shard's table (the same storage), and answers as a separate
    encoder part does."""
    from seater_dist.serve.replicas import single_parts
    from seater_dist.serve.seater_parts import SeaterEncoderPart

    encoder, (shard,) = single_parts(ServeArgs(checkpoint=str(run_dir / "seater" / "best"), layout="single",
                                                serial_load=False))
    own = encoder.model.tok_emb.weight
    assert own.untyped_storage().data_ptr() == shard.model.tok_emb.weight.untyped_storage().data_ptr()
    alone = SeaterEncoderPart(load_checkpoint(run_dir / "seater" / "best"))
    assert alone.model.tok_emb.weight.untyped_storage().data_ptr() != own.untyped_storage().data_ptr()
    histories = _histories(5)
    for a, b in zip(encoder.encode(histories), alone.encode(histories)):
        np.testing.assert_array_equal(a.state, b.state)


def test_shards_must_not_outnumber_the_roots_children(run_dir):
    assert [g.tolist() for g in shard_roots(4, 3)] == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="shards must be in 1..4"):
        shard_roots(4, 5)
    with pytest.raises(ValueError, match=r"shards: 5 > 4, the children of the tree's root"):
        build_app({"checkpoint": str(run_dir / "seater" / "best"), "shards": 5})
    with pytest.raises(ValueError, match="serve args: shardz: Extra inputs are not permitted"):
        build_app({"checkpoint": str(run_dir / "seater" / "best"), "shardz": 2})
    with pytest.raises(ValueError, match=r"shards: 5 > 4"):  # the single layout checks it too
        build_app({"checkpoint": str(run_dir / "seater" / "best"), "shards": 5, "layout": "single"})
    with pytest.raises(ValueError, match="min_replicas: 3 > max_replicas 2"):
        build_app({"checkpoint": str(run_dir / "seater" / "best"), "min_replicas": 3, "max_replicas": 2})


@pytest.mark.parametrize("shards", [1, 3])
def test_sasrec_index_shards_merge_to_exact_inner_product_search(run_dir, shards):
    ckpt = load_checkpoint(run_dir / "sasrec" / "best")
    encoder = SasrecEncoderPart(ckpt)
    states = encoder._states([np.array(h) for h in ([1, 2, 3], [7], [299, 5, 5, 9, 11, 12, 13, 14])])
    expected_ids, expected_scores = topk_inner_product(states, ckpt.item_table, 20)
    parts = [IndexShardPart(ckpt, s, shards) for s in range(shards)]
    for u in range(states.shape[0]):
        ids, scores, raw = merge_top([p.search(states[u : u + 1], 20)[0] for p in parts], 20)
        assert ids.tolist() == expected_ids[u].tolist()
        np.testing.assert_allclose(scores, expected_scores[u], rtol=1e-6)
        assert raw == [f"sku-{i:04d}" for i in ids]
    hnsw = IndexShardPart(ckpt, 0, 1, index="hnsw", ef_search=128)
    ids, _, _ = hnsw.search(states, 20)[0]
    assert len(set(ids.tolist()) & set(expected_ids[0].tolist())) >= 18  # 300 items, efSearch 128: near exact


def test_popular_items_come_from_the_runs_dataset_else_from_the_model(run_dir):
    counts = pq.read_table(run_dir / "dataset" / "items.parquet").column("count").to_numpy()
    top = [f"sku-{i:04d}" for i in np.argsort(-counts, kind="stable")[:5]]
    dataset = ShardedSeater(run_dir / "seater" / "best", 1)  # RUN/seater/best -> RUN/dataset is found
    assert dataset.encoder.popularity_source.startswith("dataset counts")
    assert dataset.recommend([["unknown-1"]], top_n=5) == [
        {"items": top, "scores": sorted(counts.astype(float), reverse=True)[:5], "ignored": ["unknown-1"],
         "fallback": "popular"}]
    model = ShardedSeater(run_dir / "v2" / "seater" / "best", 1)  # no dataset beside it
    assert model.encoder.popularity_source == "model (answer to an empty history)"
    expected = SeaterRetriever.from_checkpoint(run_dir / "v2" / "seater" / "best").recommend([[]], top_n=5)[0]
    assert model.recommend([[]], top_n=5)[0]["items"] == expected["items"]


# ------------------------------------------------------------------------------------------ pure: the contract


@pytest.mark.parametrize("body, status, field", [
    (b"{", 422, "body"),
    (b"[1, 2]", 422, "body"),
    (b'{"top_n": 5}', 422, "history"),
    (b'{"history": "sku-0001"}', 422, "history"),
    (b'{"history": ["a", null]}', 422, "history[1]"),
    (b'{"history": ["a", 1.5]}', 422, "history[1]"),
    (b'{"history": [true]}', 422, "history[0]"),
    (b'{"history": [], "top_n": "5"}', 422, "top_n"),
    (b'{"history": [], "top_n": 5.0}', 422, "top_n"),
    (b'{"history": [], "top_n": -3}', 422, "top_n"),
    (b'{"history": [], "top_n": 0}', 422, "top_n"),
    (b'{"history": [], "top_n": 51}', 422, "top_n"),
    (b'{"history": [], "top_n": 100000000000000000000000000000}', 422, "top_n"),
    (b'{"history": [], "topn": 5}', 422, "topn"),
    (b"\xff\xfe", 422, "body"),
    (b" " * 70000, 413, "body"),
    (b'{"history": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, "body"),  # 60 KB, 30,000 levels deep
])
def test_bad_requests_name_the_field(body, status, field):
    with pytest.raises(RequestError) as info:
        parse_recommend(body, max_top_n=50)
    assert (info.value.status, info.value.field) == (status, field)
    assert set(info.value.body()) == {"error", "field", "problem"}


def test_good_requests_parse():
    assert parse_recommend(b'{"history": ["a", 17]}', 50).history == ["a", "17"]
    assert parse_recommend(b'{"history": []}', 50).top_n == 50
    assert parse_recommend(b'{"history": [], "top_n": 7}', 8).top_n == 7
    assert parse_recommend(b'{"history": []}', 8).top_n == 8


# ------------------------------------------------------------------------------------------ config files


def test_serve_configs_are_valid_serve_deploy_schemas_naming_the_apps_deployments():
    from ray.serve.schema import ServeDeploySchema

    for name, kind in (("seater.yaml", "seater"), ("sasrec.yaml", "sasrec"), ("seater-single.yaml", "seater")):
        config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / name).read_text()))
        app = config.applications[0]
        assert app.import_path == "seater_dist.serve.app:build_app"
        assert [d.name for d in app.deployments] == deployment_names(kind, app.args["shards"],
                                                                     app.args.get("layout", "split"))
        ServeArgs.model_validate(app.args)  # every arg is one build_app takes
        assert config.http_options.host == "127.0.0.1"


def test_seater_serve_refuses_a_bad_checkpoint_in_one_line_before_starting_ray(tmp_path, capsys):
    from seater_dist.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seater serve: error:") and "missing" in err[0]


def test_seater_serve_refuses_more_warm_replicas_than_its_ceiling_in_one_line(run_dir, capsys):
    from seater_dist.cli import main

    assert main(["serve", "--checkpoint", str(run_dir / "seater" / "best"), "--min-replicas", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["seater serve: error: serve args: min_replicas: 3 > max_replicas 2"]


# ------------------------------------------------------------------------------------------ on Serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_url() -> str:
    import ray._private.worker as worker

    return "http://" + worker._global_node.webui_url.removeprefix("http://")


def _serve_deploy(config: dict, tmp: Path) -> None:
    """`serve deploy` (the CLI, through the dashboard's REST API) of a config dict."""
    path = tmp / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", str(path), "-a", _dashboard_url()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def service(ray_session, run_dir, tmp_path_factory):
    """serve/seater.yaml deployed with `serve deploy` (2 beam shards, b = 50) on a free loopback port."""
    import requests
    from ray import serve
    from ray.serve.api import RunTarget

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    config = yaml.safe_load((ROOT / "serve" / "seater.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["checkpoint"] = str(run_dir / "seater" / "best")
    config["applications"][0]["args"]["serial_load"] = False  # tiny checkpoints: load side by side
    tmp = tmp_path_factory.mktemp("serve")
    _serve_deploy(config, tmp)  # returns at once; the replicas start meanwhile
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    serve.run_many([  # the other tests' applications, started together (each test deletes its own)
        RunTarget(build_app({"checkpoint": str(run_dir / "seater" / "best"), "shards": 4, "beam_size": N,
                             "serial_load": False}),
                  name="wide", route_prefix="/wide", logging_config=quiet),
        RunTarget(build_app({"checkpoint": str(run_dir / "sasrec" / "best"), "shards": 2, "serial_load": False}),
                  name="sasrec", route_prefix="/sasrec", logging_config=quiet),
        RunTarget(build_app({"checkpoint": str(run_dir / "seater" / "best"), "shards": 2, "layout": "single",
                             "serial_load": False}),
                  name="single", route_prefix="/single", logging_config=quiet)])
    url = f"http://127.0.0.1:{port}"
    _wait_for(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200, 240, "the service")
    yield {"url": url, "config": config, "tmp": tmp, "port": port}
    serve.shutdown()  # Serve only: the session's Ray stays for the other modules


def _post(url: str, body, timeout: float = 60):
    import requests

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/recommend", data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def test_http_round_trip_equals_seater_retriever(service, run_dir):
    import requests

    url = service["url"]
    retriever = SeaterRetriever.from_checkpoint(run_dir / "seater" / "best")
    histories = [*_histories(6, seed=3), ["sku-0001", "not-an-item", "sku-0002"], [f"sku-{i:04d}" for i in range(40)]]
    for history, top_n in zip(histories, [50, 10, 1, 50, 25, 5, 50, 50]):
        expected = retriever.recommend([history], top_n=top_n)[0]
        r = _post(url, {"history": history, "top_n": top_n})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["items"] == expected["items"] and got["ignored"] == expected["ignored"]
        np.testing.assert_allclose(got["scores"], expected["scores"], rtol=2e-6, atol=1e-5)
        assert got["model_version"] == retriever.model_version and "fallback" not in got
    integer_ids = _post(url, {"history": [12, 873]})  # integers match by their decimal string
    assert integer_ids.status_code == 200 and integer_ids.json()["ignored"] == ["12", "873"]
    version = requests.get(f"{url}/version", timeout=30).json()
    assert version["model_version"] == retriever.model_version and version["num_items"] == N
    assert version["model"] == "seater" and version["shards"] == 2 and version["beam_size"] == BEAM
    assert version["tree_checksum"] and version["popularity"].startswith("dataset counts")
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok",
                                                                 "model_version": retriever.model_version}


def test_bad_requests_get_their_4xx_and_the_service_answers_afterwards(service, run_dir):
    import requests

    url = service["url"]
    cases = [
        (b"{not json", 422, "body"),
        ({"history": "sku-0001"}, 422, "history"),
        ({"history": [1.5]}, 422, "history[0]"),
        ({"top_n": 5}, 422, "history"),
        ({"history": [], "top_n": -1}, 422, "top_n"),
        ({"history": [], "top_n": 10**30}, 422, "top_n"),
        ({"history": [], "top_n": BEAM + 1}, 422, "top_n"),
        (b"x" * (10 * 1024 * 1024), 413, "body"),
        (b"[" * 30000 + b"]" * 30000, 400, "body"),  # nested 30,000 deep: once a RecursionError and a 500
    ]
    for body, status, field in cases:
        r = _post(url, body)
        assert r.status_code == status, (body[:40] if isinstance(body, bytes) else body, r.text)
        assert r.json()["field"] == field and r.json()["problem"] and "Traceback" not in r.text
    missing = requests.get(f"{url}/recommend", timeout=30)
    assert missing.status_code == 405 and missing.json()["field"] == "path"
    only_unknown = _post(url, {"history": ["nope-1", "nope-2"], "top_n": 3})
    assert only_unknown.status_code == 200
    counts = pq.read_table(run_dir / "dataset" / "items.parquet").column("count").to_numpy()
    assert only_unknown.json() == {
        "items": [f"sku-{i:04d}" for i in np.argsort(-counts, kind="stable")[:3]],
        "scores": sorted(counts.astype(float), reverse=True)[:3], "model_version": only_unknown.json()["model_version"],
        "ignored": ["nope-1", "nope-2"], "fallback": "popular"}
    assert _post(url, {"history": []}).json()["fallback"] == "popular"
    after = _post(url, {"history": ["sku-0001"], "top_n": 5})
    assert after.status_code == 200 and len(after.json()["items"]) == 5


def test_four_shard_service_with_a_full_beam_returns_the_single_process_ranking(service, run_dir):
    from ray import serve

    path = run_dir / "seater" / "best"  # "wide": 4 shards, beam N (started by the service fixture)
    try:
        retriever = SeaterRetriever.from_checkpoint(path)
        retriever.settings = retriever.settings.model_copy(update={"beam_size": N})  # the same full beam
        for history in _histories(4, seed=5):
            r = _post(f"{service['url']}/wide", {"history": history, "top_n": N})
            assert r.status_code == 200, r.text
            expected = retriever.recommend([history], top_n=N)[0]
            assert r.json()["items"] == expected["items"] and len(expected["items"]) == N
    finally:
        serve.delete("wide")


def test_single_layout_answers_as_the_split_service_does_from_one_deployment(service, run_dir):
    """layout: single (one deployment holding the encoder and both shards, no calls between deployments):
    the same answers as SeaterRetriever, the popular fallback, a 4xx for a bad request."""
    from ray import serve

    url = f"{service['url']}/single"
    try:
        retriever = SeaterRetriever.from_checkpoint(run_dir / "seater" / "best")
        for history, top_n in zip(_histories(4, seed=7), [50, 10, 1, 50]):
            r = _post(url, {"history": history, "top_n": top_n})
            assert r.status_code == 200, r.text
            expected = retriever.recommend([history], top_n=top_n)[0]
            assert r.json()["items"] == expected["items"] and r.json()["model_version"] == retriever.model_version
            np.testing.assert_allclose(r.json()["scores"], expected["scores"], rtol=2e-6, atol=1e-5)
        unknown = _post(url, {"history": ["not-an-item"], "top_n": 5}).json()
        assert unknown["fallback"] == "popular" and len(unknown["items"]) == 5
        assert _post(url, {"history": ["sku-0001"], "top_n": -1}).status_code == 422
        running = sorted(serve.status().applications["single"].deployments)
        assert running == deployment_names("seater", 2, "single") == ["Router"]
    finally:
        serve.delete("single")


def test_sasrec_is_served_through_the_same_api(service, run_dir):
    from ray import serve

    path = run_dir / "sasrec" / "best"  # 2 flat index shards (started by the service fixture)
    try:
        ckpt = load_checkpoint(path)
        history = ["sku-0003", "sku-0100", "unknown"]
        expected = ckpt.topk([[3, 100]], 10)[0]
        r = _post(f"{service['url']}/sasrec", {"history": history, "top_n": 10})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["items"] == [f"sku-{i:04d}" for i in expected] and got["ignored"] == ["unknown"]
        assert got["model_version"] == ckpt.model_version
        assert _post(f"{service['url']}/sasrec", {"history": [], "top_n": 3}).json()["fallback"] == "popular"
    finally:
        serve.delete("sasrec")


class _Load:
    """Sequential requests in a thread (~``rps`` a second) until stopped; records every outcome."""

    def __init__(self, url: str, rps: float = 10.0) -> None:
        self.url, self.pause = url, 1.0 / rps
        self.results: list[tuple[float, int, str]] = []  # (time, status, model_version or error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        histories = _histories(20, seed=7)
        i = 0
        while not self._stop.is_set():
            try:
                r = _post(self.url, {"history": histories[i % len(histories)], "top_n": 10}, timeout=60)
                version = r.json().get("model_version", r.text[:200]) if r.status_code == 200 else r.text[:200]
                self.results.append((time.monotonic(), r.status_code, version))
            except Exception as err:  # noqa: BLE001 - a failed request is an outcome to count
                self.results.append((time.monotonic(), -1, repr(err)[:200]))
            i += 1
            self._stop.wait(self.pause)

    @property
    def failed(self) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[1] != 200]


def _replicas(app: str, deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def test_a_killed_shard_replica_is_replaced_under_load(service, record_property):
    import ray
    from ray import serve

    url = service["url"]
    (victim,) = _replicas("seater", "BeamShard0")
    with _Load(url) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # by its replica id, nothing else

        def replaced() -> bool:
            names = _replicas("seater", "BeamShard0")
            status = serve.status().applications["seater"].deployments["BeamShard0"].status
            return bool(names) and victim not in names and status == "HEALTHY"

        _wait_for(replaced, 120, "a new BeamShard0 replica")
        recovered_at = time.monotonic()
        time.sleep(2)
    after = [_post(url, {"history": ["sku-0001", "sku-0002"], "top_n": 5}) for _ in range(5)]
    assert [r.status_code for r in after] == [200] * 5
    during = [r for r in load.results if killed_at <= r[0] <= recovered_at]
    print(f"\nshard replica killed: replaced after {recovered_at - killed_at:.1f} s; {len(load.failed)} of "
          f"{len(load.results)} requests failed ({len(during)} sent while it was down)")
    record_property("kill_failed_requests", len(load.failed))
    record_property("kill_total_requests", len(load.results))
    assert len(load.results) >= 3  # requests were in flight around the kill (each waits for a live replica)


def test_rollout_to_a_second_checkpoint_fails_no_request(service, run_dir):
    import requests

    url = service["url"]
    old = requests.get(f"{url}/version", timeout=30).json()["model_version"]
    new = load_checkpoint(run_dir / "v2" / "seater" / "best").model_version
    assert old != new
    config = json.loads(json.dumps(service["config"]))
    config["applications"][0]["args"]["checkpoint"] = str(run_dir / "v2" / "seater" / "best")
    with _Load(url) as load:
        time.sleep(1)
        _serve_deploy(config, service["tmp"])
        _wait_for(lambda: all(requests.get(f"{url}/version", timeout=10).json()["model_version"] == new
                              for _ in range(5)) and _settled(), 240, "the new version on every replica")
        time.sleep(2)
    versions = [r[2] for r in load.results if r[1] == 200]
    assert load.failed == [], load.failed[:5]
    assert versions[0] == old and versions[-1] == new
    assert set(versions) == {old, new}


def _settled() -> bool:
    """The app is RUNNING and no deployment is still replacing replicas."""
    from ray import serve

    app = serve.status().applications["seater"]
    return app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())


@pytest.mark.ray  # its own Ray, in a child process
def test_seater_serve_direct_ingress_answers_on_the_replicas_own_port_as_through_the_proxy(run_dir):
    """`seater serve --direct-ingress` (its own private Ray, in a child process): the Router replica answers on
    its own port (--port + 1 and up) what the proxy on --port answers, and Ctrl-C (SIGTERM) stops it all."""
    import os
    import re
    import signal

    import requests

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    cmd = [str(Path(sys.executable).with_name("seater")), "serve", "--checkpoint", str(run_dir / "seater" / "best"),
           "--layout", "single", "--max-replicas", "1", "--direct-ingress", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        found = _wait_for(lambda: next((ln for ln in lines if "direct ingress" in ln), None), 240,
                          "the direct-ingress line")
        direct = re.findall(r"http://[\d.]+:(\d+)", found)
        assert direct and all(int(p) > port for p in direct), found
        history = _histories(1)[0]
        via_proxy = _post(f"http://127.0.0.1:{port}", {"history": history, "top_n": 10})
        via_replica = _post(f"http://127.0.0.1:{direct[0]}", {"history": history, "top_n": 10})
        assert via_proxy.status_code == via_replica.status_code == 200
        assert via_proxy.json()["items"] == via_replica.json()["items"]
        assert requests.get(f"http://127.0.0.1:{direct[0]}/version", timeout=10).json()["num_items"] == N
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    assert code == 0, "".join(lines)[-3000:]
