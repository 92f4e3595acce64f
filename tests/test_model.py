"""SeaterModel: constrained softmax, cached decoding, training signal, gradient routing, sparse gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.synthetic import random_balanced_tree
from seater_dist.config import SeaterSettings
from seater_dist.model.layers import KVCache
from seater_dist.model.seater import SeaterModel


def tiny_settings(**overrides) -> SeaterSettings:
    base = dict(d_model=16, n_heads=2, ffn_dim=32, dropout=0.0, input_dropout=0.0, history_len=6, beam_size=8)
    return SeaterSettings(**{**base, **overrides})


def random_batch(tree, batch: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded histories [B, t] (row 0 full, row 1 empty, others random lengths) and targets [B]."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, tree.num_items, (batch, t), generator=g)
    lengths = torch.randint(1, t + 1, (batch,), generator=g)
    lengths[0], lengths[1] = t, 0
    history[torch.arange(t)[None, :] < (t - lengths)[:, None]] = tree.pad
    return history, torch.randint(0, tree.num_items, (batch,), generator=g)


def test_constrained_softmax_equals_full_softmax_restricted_to_children():
    torch.manual_seed(0)
    tree = random_balanced_tree(10, k=3, seed=1)  # nodes with 3 and with fewer children
    model = SeaterModel(tree, tiny_settings()).double()
    prev = torch.tensor([tree.bos, *range(tree.num_items + 2, tree.num_tokens)])
    states = torch.randn(prev.numel(), 16, dtype=torch.float64)
    log_probs, children = model.constrained_log_probs(states, prev)

    full = torch.log_softmax(states @ model.tok_emb.weight.T, dim=-1)  # over the whole vocabulary
    for row, token in enumerate(prev.tolist()):
        kids = tree.children_of(np.array([token]))[0]
        kids = torch.from_numpy(kids[kids >= 0]).long()
        restricted = full[row, kids] - torch.logsumexp(full[row, kids], dim=0)
        n = kids.numel()
        assert torch.equal(children[row, :n], kids)
        torch.testing.assert_close(log_probs[row, :n], restricted)
        assert torch.isneginf(log_probs[row, n:]).all() and (children[row, n:] == tree.pad).all()


def test_constrained_softmax_of_pad_is_all_minus_inf_not_nan():
    tree = random_balanced_tree(10, k=3)
    model = SeaterModel(tree, tiny_settings())
    log_probs, _ = model.constrained_log_probs(torch.randn(2, 16), torch.tensor([tree.pad, tree.pad]))
    assert torch.isneginf(log_probs).all()


@pytest.mark.parametrize("layers", [1, 3])
def test_cached_decoding_equals_teacher_forced(layers):
    torch.manual_seed(0)
    tree = random_balanced_tree(60, k=4, seed=2)  # D = 3
    model = SeaterModel(tree, tiny_settings(decoder_layers=layers, encoder_layers=layers)).eval()
    history, _ = random_batch(tree, 5, 6, seed=3)
    items = torch.randint(0, tree.num_items, (5, 7))
    with torch.no_grad():
        memory, pad_mask = model.encode(history)
        mem_kv = model.memory_kv(memory)
        inputs = model.decoder_inputs(model.identifiers(items))  # [B, G, D]
        full = model.decode(inputs, mem_kv, pad_mask)
        caches = [KVCache(model.depth) for _ in model.decoder]
        steps = [model.decode(inputs[:, :, i : i + 1], mem_kv, pad_mask, caches, start=i) for i in range(tree.depth)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, rtol=1e-5, atol=1e-5)
    assert caches[0].length == tree.depth


def test_encode_keeps_last_t_items_and_defines_empty_history():
    tree = random_balanced_tree(40, k=4)
    model = SeaterModel(tree, tiny_settings()).eval()
    long = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        mem_long, _ = model.encode(long)
        mem_last, _ = model.encode(long[:, -6:])
        mem_empty, mask = model.encode(torch.full((2, 6), tree.pad))
    torch.testing.assert_close(mem_long, mem_last)
    assert torch.isfinite(mem_empty).all() and (~mask).sum(1).tolist() == [1, 1]


def test_short_history_is_placed_at_the_last_positions():
    """A [B, t'] history with t' < t equals the same history left-padded to t."""
    tree = random_balanced_tree(40, k=4)
    model = SeaterModel(tree, tiny_settings()).eval()
    short = torch.randint(0, 40, (2, 3))
    padded = torch.cat([torch.full((2, 3), tree.pad), short], dim=1)
    with torch.no_grad():
        a = model.item_log_probs(short, torch.arange(40).expand(2, 40))
        b = model.item_log_probs(padded, torch.arange(40).expand(2, 40))
    torch.testing.assert_close(a, b)


def test_forward_reports_each_loss_and_switches_them_off():
    torch.manual_seed(0)
    tree = random_balanced_tree(64, k=4)
    history, target = random_batch(tree, 8, 6, seed=0)
    out = SeaterModel(tree, tiny_settings(lambda_ali=0.3, lambda_rank=0.7))(history, target)
    assert set(out) == {"loss", "gen", "ali", "rank"}
    assert all(out[name].item() > 0 for name in ("gen", "ali", "rank"))
    torch.testing.assert_close(out["loss"], out["gen"] + 0.3 * out["ali"] + 0.7 * out["rank"])
    off = SeaterModel(tree, tiny_settings(use_alignment=False, use_ranking=False))(history, target)
    assert off["ali"].item() == 0.0 and off["rank"].item() == 0.0
    torch.testing.assert_close(off["loss"], off["gen"])


@pytest.mark.parametrize("name", ["gen", "ali", "rank"])
def test_training_lowers_each_loss(name):
    """A few Adam steps on one loss alone lower it (same sampled negatives before and after)."""
    torch.manual_seed(0)
    tree = random_balanced_tree(64, k=4, seed=5)  # D = 3: ranking negatives at prefix 1 and 0
    model = SeaterModel(tree, tiny_settings())
    history, target = random_batch(tree, 32, 6, seed=1)

    def measure() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return model(history, target)[name].item()

    before = measure()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        model(history, target)[name].backward()
        opt.step()
    after = measure()
    assert after < 0.8 * before, f"{name}: {before:.4f} -> {after:.4f}"


def test_training_step_lowers_total_loss():
    torch.manual_seed(0)
    tree = random_balanced_tree(64, k=4, seed=5)
    model = SeaterModel(tree, tiny_settings(dropout=0.2))
    history, target = random_batch(tree, 32, 6, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = model(history, target)["loss"]
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_gradients_reach_every_parameter_and_w_s_only_through_ranking():
    torch.manual_seed(0)
    tree = random_balanced_tree(64, k=4)
    model = SeaterModel(tree, tiny_settings(encoder_layers=2, decoder_layers=2))
    history, target = random_batch(tree, 16, 6, seed=2)

    out = model(history, target)
    (out["gen"] + out["ali"]).backward()
    assert model.w_s.grad is None, "W_s must not learn from L_gen or L_ali"
    model.zero_grad(set_to_none=True)

    model(history, target)["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} gets no gradient"

    model.zero_grad(set_to_none=True)
    model(history, target)["rank"].backward()
    assert model.w_s.grad.abs().sum() > 0

    no_rank = SeaterModel(tree, tiny_settings(use_ranking=False))
    no_rank(history, target)["loss"].backward()
    assert no_rank.w_s.grad is None


def test_sparse_embedding_gradient_is_sparse_and_equals_dense():
    tree = random_balanced_tree(500, k=4, seed=0)
    settings = tiny_settings()
    dense = SeaterModel(tree, settings)
    sparse = SeaterModel(tree, settings, sparse_embedding=True)
    sparse.load_state_dict(dense.state_dict())
    history, target = random_batch(tree, 4, 6, seed=4)
    for model in (dense, sparse):
        torch.manual_seed(7)  # same ranking negatives
        model(history, target)["loss"].backward()

    grad = sparse.tok_emb.weight.grad
    assert grad.is_sparse
    torch.testing.assert_close(grad.to_dense(), dense.tok_emb.weight.grad)
    rows = grad.coalesce().indices()[0]
    assert rows.numel() < tree.num_tokens // 4, "a batch of 4 must touch a few rows, not the table"
    touched = dense.tok_emb.weight.grad.abs().sum(1) > 0
    assert set(torch.nonzero(touched).flatten().tolist()) <= set(rows.tolist())
    for name, param in dense.named_parameters():
        if name != "tok_emb.weight":
            torch.testing.assert_close(dict(sparse.named_parameters())[name].grad, param.grad)


def test_tree_arrays_are_buffers_outside_the_state_dict():
    tree = random_balanced_tree(30, k=4)
    model = SeaterModel(tree, tiny_settings())
    keys = set(model.state_dict())
    buffers = ("child_table", "item_codes", "token_parent", "token_level", "rank_sampler")
    assert not any(k.startswith(buffers) for k in keys)
    assert torch.equal(model.item_codes, torch.from_numpy(tree.codes))
    assert model.tok_emb.weight.shape == (tree.num_tokens, 16)


def test_heads_must_divide_the_model_width_at_load_time():
    from seater_dist.config import RunSettings, SettingsError

    with pytest.raises(SettingsError, match="seater: .*d_model=64 is not divisible by n_heads=3"):
        RunSettings.model_validate({"seater": {"n_heads": 3}})


def test_out_of_range_ids_fail_with_clear_errors():
    tree = random_balanced_tree(20, k=4)
    model = SeaterModel(tree, tiny_settings())
    with pytest.raises(ValueError, match="history holds token 20: expected item ids 0..19 or PAD=21"):
        model.encode(torch.tensor([[0, tree.bos]]))
    with pytest.raises(ValueError, match="target holds ids outside 0..19"):
        model(torch.tensor([[0, 1]]), torch.tensor([20]))


def test_ddp_skips_the_tree_buffers():
    tree = random_balanced_tree(30, k=4)
    model = SeaterModel(tree, tiny_settings())
    assert set(model._ddp_params_and_buffers_to_ignore) == {name for name, _ in model.named_buffers()}
    assert "child_table" in model._ddp_params_and_buffers_to_ignore
    assert not any(n in model._ddp_params_and_buffers_to_ignore for n, _ in model.named_parameters())


def test_token_table_can_start_from_item_embeddings_and_subtree_means():
    tree = random_balanced_tree(50, k=4, seed=1)
    item_emb = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    means = tree.subtree_means(item_emb)
    node = int(tree.codes[7, 0])  # a level-1 node
    assert np.allclose(means[node], item_emb[tree.items_under(node)].mean(0), atol=1e-6)
    assert np.allclose(means[tree.bos], item_emb.mean(0), atol=1e-6) and not means[tree.pad].any()
    settings = SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5, embedding_init_std=0.1)
    model = SeaterModel(tree, settings)
    model.init_tokens_from(tree, item_emb)
    table = model.tok_emb.weight.detach().numpy()
    scale = table[0, 0] / item_emb[0, 0]
    assert np.allclose(table[:50], item_emb * scale, atol=1e-6)
    assert np.allclose(table[node], means[node] * scale, atol=1e-6)
    assert table[:50].std() == pytest.approx(0.1, rel=1e-4)
