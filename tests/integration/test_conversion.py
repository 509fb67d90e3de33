"""HF -> Megatron shards -> HF is bit-exact, and the Megatron model computes transformers' logits, for every family
({qwen3, qwen2, llama} x {untied, tied} x TP {1, 2}) and with a padded vocabulary.

One torchrun per TP size checks all its models (a torchrun costs ~7 s); each case still passes or fails alone.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, make_model, run_ranks

pytestmark = pytest.mark.integration

FAMILY_CASES = [f"{family}-{tie}" for family in ("qwen3", "qwen2", "llama") for tie in ("untied", "tied")]
# Vocabulary 500 padded to 512 (a multiple of 64 x TP 2): the output layer's padding (untied) and the embedding's
# (tied, where the output layer is the embedding).
PADDED_CASES = {"qwen3-untied-vocab500": 64, "llama-tied-vocab500": 64}
_QWEN2 = ("--family", "qwen2", "--hidden-size", "128")  # vLLM's Qwen2: head_dim = hidden_size / heads
_BUILT_HERE = {  # case -> make_model arguments (the untied qwen3/qwen2/llama models are conftest fixtures)
    "qwen2-tied": (*_QWEN2, "--tie-word-embeddings", "--seed", "4"),
    "llama-tied": ("--family", "llama", "--tie-word-embeddings", "--seed", "5"),
    "qwen3-untied-vocab500": ("--vocab-size", "500", "--seed", "6"),
    "llama-tied-vocab500": ("--family", "llama", "--tie-word-embeddings", "--vocab-size", "500", "--seed", "7"),
}


@pytest.fixture(scope="module")
def models(request, tmp_path_factory) -> dict:
    built = {case: request.getfixturevalue(fixture) for case, fixture in (
        ("qwen3-untied", "tiny_model"), ("qwen3-tied", "tiny_model_tied"),
        ("qwen2-untied", "tiny_model_qwen2"), ("llama-untied", "tiny_model_llama"))}
    for case, args in _BUILT_HERE.items():
        built[case] = make_model(tmp_path_factory.mktemp(case) / "model", *args)
    return built


@pytest.fixture(scope="module")
def reports(models, tmp_path_factory):
    """reports(tp) -> {case: report}, running the checks for that TP size once."""
    cache: dict[int, dict] = {}

    def get(tp: int) -> dict:
        if tp not in cache:
            cases = {c: 1 for c in FAMILY_CASES} | (PADDED_CASES if tp == 2 else {})
            specs = {c: f"{models[c]}:{divisible_by}" for c, divisible_by in cases.items()}
            path = tmp_path_factory.mktemp(f"tp{tp}") / "report.json"
            proc = run_ranks(tp, ROOT / "tests/integration/scripts/check_conversion.py", str(tp), str(path),
                             *specs.values(), timeout_s=300)
            assert proc.returncode == 0
            by_spec = json.loads(path.read_text())
            cache[tp] = {c: by_spec[spec] for c, spec in specs.items()}
        return cache[tp]

    return get


@pytest.mark.numerics
@pytest.mark.parametrize("tp, case", [(1, c) for c in FAMILY_CASES] + [(2, c) for c in [*FAMILY_CASES, *PADDED_CASES]])
def test_megatron_matches_transformers_and_round_trips(reports, tp, case):
    report = reports(tp)[case]
    assert report["family"] == case.split("-")[0]
    assert report["tied"] == ("-tied" in case)
    assert report["max_logit_abs_diff"] <= 2e-5
    assert report["max_logprob_abs_diff"] <= 2e-5
    assert report["max_entropy_abs_diff"] <= 2e-5
    assert report["rope_inv_freq_equal"]
    assert report["exported_names_equal"]
    assert report["mismatched_tensors"] == []  # bit-exact: torch.equal on every tensor
    if case in PADDED_CASES:
        assert (report["vocab_size"], report["padded_vocab_size"], report["megatron_logits_width"]) == (500, 512, 512)
        assert report["unmasked_logprob_abs_diff"] > 1e-3  # the mask is what keeps the padding out of the softmax
