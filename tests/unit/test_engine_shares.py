"""The direct sync's writes (`dense.to_engine`): from the Megatron pieces of any training TP size, each engine rank
gets exactly the tensors vLLM's own loader would build for it, every element written once.

The reference below is written from the HF tensors the way vLLM's loaders lay them out per tensor-parallel rank
(q/k/v fused with kv heads replicated past their number, gate/up fused, row-parallel layers split on the input
dim, the vocabulary padded to 64 and split, padding rows zero). The real loader is compared in
tests/integration/test_weight_sync.py."""

from __future__ import annotations

import pytest
import torch

from vime_spmd.sync.weights import EngineTensor, apply_write
from vime_spmd.tools.make_tiny_model import build_model, parse_args
from vime_spmd.train.megatron.families import FAMILIES

VLLM_VOCAB_PADDING = 64


def _hf_state(family: str, heads: int, kv_heads: int, tied: bool, vocab: int):
    args = parse_args(["unused", "--family", family, "--hidden-size", str(16 * heads), "--num-heads", str(heads),
                       "--num-kv-heads", str(kv_heads), "--head-dim", "16", "--intermediate-size", "48",
                       "--num-layers", "2", *(["--tie-word-embeddings"] if tied else [])])
    model = build_model(args, vocab)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    if tied:
        del state["lm_head.weight"]
    return model.config, state


def _vllm_rank_tensors(state: dict, cfg, rank: int, size: int) -> dict[str, tuple[torch.Tensor, tuple | None]]:
    """name -> (tensor, vocab rows) of engine rank `rank` of `size`, built from the HF tensors."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = {}
    padded = -(-cfg.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    per = padded // size
    lo, hi = rank * per, min((rank + 1) * per, cfg.vocab_size)  # vLLM's rows of rank: hi < lo past the end
    for hname in ("model.embed_tokens.weight", "lm_head.weight"):
        if hname in state:
            t = torch.zeros(per, cfg.hidden_size)
            t[: max(hi - lo, 0)] = state[hname][lo:hi]
            out[hname] = (t, (lo, hi))
    out["model.norm.weight"] = (state["model.norm.weight"], None)
    for i in range(cfg.num_hidden_layers):
        h = f"model.layers.{i}."
        for suffix in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                       "self_attn.k_norm.weight"):
            if h + suffix in state:
                out[h + suffix] = (state[h + suffix], None)
        for kind in ("weight", "bias"):
            if h + f"self_attn.q_proj.{kind}" not in state:
                continue
            q = state[h + f"self_attn.q_proj.{kind}"].unflatten(0, (heads, hd)).chunk(size)[rank]
            kv_head = [rank * kv // size] if size > kv else range(rank * kv // size, (rank + 1) * kv // size)
            k, v = (state[h + f"self_attn.{p}_proj.{kind}"].unflatten(0, (kv, hd))[list(kv_head)] for p in "kv")
            out[h + f"self_attn.qkv_proj.{kind}"] = (torch.cat([q, k, v]).flatten(0, 1), None)
        out[h + "self_attn.o_proj.weight"] = (state[h + "self_attn.o_proj.weight"].chunk(size, dim=1)[rank], None)
        out[h + "mlp.gate_up_proj.weight"] = (torch.cat([state[h + f"mlp.{p}_proj.weight"].chunk(size)[rank]
                                                         for p in ("gate", "up")]), None)
        out[h + "mlp.down_proj.weight"] = (state[h + "mlp.down_proj.weight"].chunk(size, dim=1)[rank], None)
    return out


def _layouts():
    """Every valid (model, training TP, engine TP) of the models below: training TP divides the kv heads (Megatron);
    engine TP divides the heads and, past the kv heads, is a multiple of them (vLLM replicates kv heads)."""
    for family, heads, kv_heads, tied in [("qwen3", 4, 2, False), ("qwen3", 8, 2, True), ("qwen2", 4, 4, False),
                                          ("llama", 8, 1, False)]:
        for train_tp in (1, 2, 4):
            for engine_tp in (1, 2, 4, 8):
                if kv_heads % train_tp == 0 and heads % engine_tp == 0 and (
                        engine_tp <= kv_heads or engine_tp % kv_heads == 0):
                    yield family, heads, kv_heads, tied, train_tp, engine_tp


@pytest.mark.parametrize("family,heads,kv_heads,tied,train_tp,engine_tp", list(_layouts()))
@pytest.mark.parametrize("divisible_by", [1, 128])
@pytest.mark.parametrize("vocab", [300, 100])  # 300: the last shard is partial; 100 over 8 ranks: one is all padding
def test_each_engine_rank_gets_exactly_its_share(family, heads, kv_heads, tied, train_tp, engine_tp, divisible_by,
                                                 vocab):
    cfg, state = _hf_state(family, heads, kv_heads, tied, vocab)
    fam = FAMILIES[family]
    shape = fam.shape_from_hf(cfg, train_tp, divisible_by)
    ranks = [fam.to_megatron(state, shape, r, train_tp) for r in range(train_tp)]
    for rank in range(engine_tp):
        expected = _vllm_rank_tensors(state, cfg, rank, engine_tp)
        specs = {n: EngineTensor(tuple(t.shape), rows) for n, (t, rows) in expected.items()}
        got = {n: torch.full(s.shape, float("nan")) for n, s in specs.items()}
        written = dict.fromkeys(got, 0)
        for mname in ranks[0]:
            # Norms are replicated over training TP ranks: the sync hands over one piece, like the actor does.
            pieces = [ranks[0][mname]] if "layernorm" in mname else [r[mname] for r in ranks]
            for w in fam.to_engine(mname, pieces, shape, rank, engine_tp, specs):
                written[w.name] += apply_write(got[w.name], w)
        assert written == {n: t.numel() for n, t in got.items()}, "some element not written exactly once"
        for name, (tensor, _) in expected.items():
            assert torch.equal(got[name], tensor), f"{name}: engine rank {rank} of {engine_tp}, train TP {train_tp}"


def _plan_and_specs(train_tp: int, engine_tp: int, vocab: int = 256):
    cfg, state = _hf_state("qwen3", 4, 2, False, vocab)
    fam = FAMILIES["qwen3"]
    shape = fam.shape_from_hf(cfg, train_tp, 1)
    rank0 = fam.to_megatron(state, shape, 0, train_tp)
    plan = [(n, t.shape, t.dtype, "layernorm" not in n) for n, t in rank0.items()]
    specs = [{n: EngineTensor(tuple(t.shape), rows) for n, (t, rows) in _vllm_rank_tensors(state, cfg, e,
                                                                                          engine_tp).items()}
             for e in range(engine_tp)]
    writes_of = lambda name, pieces, e, size, tensors: fam.to_engine(name, pieces, shape, e, size, tensors)  # noqa: E731
    return plan, specs, writes_of


def test_collective_gathers_nothing_when_the_layouts_line_up():
    from vime_spmd.sync.weight_sync import own_piece_suffices

    plan, specs, writes_of = _plan_and_specs(train_tp=2, engine_tp=2)
    # 2 ranks: rank r is training TP rank r and engine rank r. Vocabulary 256: both sides split it at row 128.
    local = own_piece_suffices(plan, 2, [(0, 0, specs[0]), (1, 1, specs[1])], writes_of, 2)
    assert local == {n for n, _, _, split in plan if split}
    # Vocabulary 300: Megatron splits at row 150, vLLM (padding to 320) at 160, so engine rank 0 needs rows
    # 150-159 from training rank 1: the vocabulary tensors are gathered, every layer still is not.
    plan, specs, writes_of = _plan_and_specs(train_tp=2, engine_tp=2, vocab=300)
    local = own_piece_suffices(plan, 2, [(0, 0, specs[0]), (1, 1, specs[1])], writes_of, 2)
    vocab = {"embedding.word_embeddings.weight", "output_layer.weight"}
    assert local == {n for n, _, _, split in plan if split} - vocab


def test_collective_gathers_what_another_rank_needs():
    from vime_spmd.sync.weight_sync import own_piece_suffices

    plan, specs, writes_of = _plan_and_specs(train_tp=2, engine_tp=1)
    # Engines of TP 1 need every piece: nothing is local.
    assert own_piece_suffices(plan, 2, [(0, 0, specs[0]), (1, 0, specs[0])], writes_of, 1) == frozenset()
    # Training TP 2 into engines of TP 2, but the ranks cross over (training rank 0 is engine rank 1): every
    # split parameter needs the other piece.
    plan, specs, writes_of = _plan_and_specs(train_tp=2, engine_tp=2)
    assert own_piece_suffices(plan, 2, [(0, 1, specs[1]), (1, 0, specs[0])], writes_of, 2) == frozenset()
