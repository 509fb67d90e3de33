"""Per-family HF <-> Megatron conversion without torchrun: exact round trips at TP 2 (tied, untied, padded
vocabulary), the Megatron layouts themselves, RoPE frequencies, the refusals, and the padded-vocabulary mask."""

from __future__ import annotations

import pytest
import torch

from vime_spmd.tools.make_tiny_model import build_model, parse_args
from vime_spmd.train.megatron.families import FAMILIES, family_for

TP = 2
_SHAPE_ARGS = ["--hidden-size", "128", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32",
               "--intermediate-size", "96", "--num-layers", "2"]


def _hf_model(family: str, tied: bool = False, vocab: int = 500):
    args = parse_args(["unused", "--family", family, *_SHAPE_ARGS, *(["--tie-word-embeddings"] if tied else [])])
    return build_model(args, vocab)


def _random_state(model, tied: bool) -> dict[str, torch.Tensor]:
    """The model's names and shapes with random values (norms included), as a saved checkpoint would hold them."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    if tied:
        del state["lm_head.weight"]  # save_pretrained drops the tied copy
    return state


def _round_trip(family, hf_config, state, divisible_by: int):
    shape = family.shape_from_hf(hf_config, TP, divisible_by)
    ranks = [family.to_megatron(state, shape, r, TP) for r in range(TP)]
    assert all(r.keys() == ranks[0].keys() for r in ranks)
    exported = {}
    for name in ranks[0]:
        if name.endswith("layernorm.weight"):  # replicated: the actor sends one copy
            assert all(torch.equal(r[name], ranks[0][name]) for r in ranks)
            shards = [ranks[0][name]]
        else:
            shards = [r[name] for r in ranks]
        exported.update(family.to_hf(name, shards, shape))
    return shape, ranks, exported


@pytest.mark.parametrize("divisible_by", [1, 64], ids=["vocab500", "vocab500-padded512"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_round_trip_is_exact(name, tied, divisible_by):
    model = _hf_model(name, tied)
    family = family_for(model.config)
    assert family.name == name
    state = _random_state(model, tied)
    shape, ranks, exported = _round_trip(family, model.config, state, divisible_by)
    assert sorted(exported) == sorted(state)
    assert [k for k in state if not torch.equal(exported[k], state[k])] == []
    # 500 rows -> 500 (a multiple of 1 x 2) or 512 (of 64 x 2): zero rows at the end of the last rank's slice.
    assert shape.padded_vocab_size == (512 if divisible_by == 64 else 500)
    assert ("output_layer.weight" in ranks[0]) == (not tied)  # tied: only the embedding is padded
    rows_per_rank = shape.padded_vocab_size // TP
    for vname in ("embedding.word_embeddings.weight", "output_layer.weight")[: 1 if tied else 2]:
        assert [r[vname].shape[0] for r in ranks] == [rows_per_rank] * TP
        last_rank_padding = ranks[-1][vname][shape.vocab_size - (TP - 1) * rows_per_rank:]
        assert last_rank_padding.shape[0] == shape.padded_vocab_size - shape.vocab_size
        assert torch.count_nonzero(last_rank_padding) == 0


@pytest.mark.parametrize("name, qk_norm, qkv_bias", [("qwen3", True, False), ("qwen2", False, True),
                                                     ("llama", False, False)])
def test_megatron_layout_per_rank(name, qk_norm, qkv_bias):
    """4 query heads in 2 groups of head_dim 32, TP 2: rank r holds group r as [q_2r; q_2r+1; k_r; v_r], and
    linear_fc1 holds [gate_r; up_r]."""
    model = _hf_model(name)
    state = _random_state(model, tied=False)
    family = family_for(model.config)
    shape = family.shape_from_hf(model.config, TP, 1)
    assert (shape.qk_layernorm, shape.add_qkv_bias) == (qk_norm, qkv_bias)
    h, m = "model.layers.1.", "decoder.layers.1."
    for r in range(TP):
        out = family.to_megatron(state, shape, r, TP)
        for kind in ("weight", "bias") if qkv_bias else ("weight",):
            q, k, v = (state[f"{h}self_attn.{p}_proj.{kind}"] for p in "qkv")
            expected = torch.cat([q[64 * r: 64 * (r + 1)], k[32 * r: 32 * (r + 1)], v[32 * r: 32 * (r + 1)]])
            assert torch.equal(out[f"{m}self_attention.linear_qkv.{kind}"], expected)
        gate, up = state[h + "mlp.gate_proj.weight"], state[h + "mlp.up_proj.weight"]  # 96 rows: 48 per rank
        assert torch.equal(out[m + "mlp.linear_fc1.weight"], torch.cat([gate[48 * r: 48 * (r + 1)],
                                                                         up[48 * r: 48 * (r + 1)]]))
        assert (m + "self_attention.q_layernorm.weight" in out) == qk_norm
        assert (m + "self_attention.linear_qkv.bias" in out) == qkv_bias


def test_llama3_rope_frequencies_match_transformers():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_model("llama").config
    shape = family_for(config).shape_from_hf(config, 1, 1)
    assert (shape.rope_theta, shape.rope_scaling_factor) == (500000.0, 8.0)
    # The arguments build_gpt_model gives GPTModel, which hands them to RotaryEmbedding.
    megatron = RotaryEmbedding(kv_channels=shape.head_dim, rotary_percent=1.0, rotary_base=int(shape.rope_theta),
                               rope_scaling=True, rope_scaling_factor=shape.rope_scaling_factor,
                               use_cpu_initialization=True).inv_freq
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.equal(megatron, hf)
    plain = RotaryEmbedding(kv_channels=shape.head_dim, rotary_percent=1.0, rotary_base=500000,
                            use_cpu_initialization=True).inv_freq
    assert not torch.equal(plain, hf)  # the scaling does change these frequencies


def _refusal(name: str, **overrides) -> str:
    config = _hf_model(name).config
    for key, value in overrides.items():
        setattr(config, key, value)
    with pytest.raises(ValueError) as err:
        family_for(config).shape_from_hf(config, 1, 1)
    return str(err.value)


def test_unsupported_configs_are_refused_with_a_reason():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 2.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "only 'factor' may vary" in _refusal("llama", rope_parameters=rope)
    assert "RoPE type 'yarn'" in _refusal("qwen3", rope_parameters={"rope_type": "yarn", "rope_theta": 1e6,
                                                                      "factor": 4.0})
    assert "attention_bias=True" in _refusal("qwen3", attention_bias=True)
    assert "mlp_bias=True" in _refusal("llama", mlp_bias=True)
    assert "sliding-window" in _refusal("qwen2", use_sliding_window=True)
    assert "hidden_act='gelu'" in _refusal("llama", hidden_act="gelu")
    assert "head_dim = hidden_size / heads" in _refusal("qwen2", head_dim=16)
    config = _hf_model("qwen3").config
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by 0"):
        family_for(config).shape_from_hf(config, 1, 0)
    config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2'.*supported: \\['llama', 'qwen2', 'qwen3'\\]"):
        family_for(config)


def test_a_checkpoint_with_unused_tensors_is_refused():
    model = _hf_model("llama")
    state = _random_state(model, tied=False)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    family = family_for(model.config)
    with pytest.raises(ValueError, match="does not use.*q_proj.bias"):
        family.to_megatron(state, family.shape_from_hf(model.config, 1, 1), 0, 1)


def test_padded_vocabulary_columns_are_masked(monkeypatch):
    """TP 1 (collectives faked as identities): logits padded with 12 columns give transformers' log-softmax over
    the true 500 columns, and finite gradients that are zero on the padding."""
    from vime_spmd.train.megatron import vocab_parallel

    monkeypatch.setattr(vocab_parallel.parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vocab_parallel.parallel_state, "get_tensor_model_parallel_group", lambda: None)
    monkeypatch.setattr(vocab_parallel, "reduce_from_tensor_model_parallel_region", lambda t: t)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(2, 5, 500), torch.full((2, 5, 12), 30.0)], dim=-1).requires_grad_()
    labels = torch.randint(0, 500, (2, 5))
    logp, entropy = vocab_parallel.logprobs_and_entropy(logits, labels, 0.7, True, vocab_size=500)
    reference = (logits[..., :500].detach() / 0.7).log_softmax(-1)
    torch.testing.assert_close(logp, reference.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1))
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[..., 500:]) == 0
