"""Prompt datasets: jsonl and parquet records, chat messages, bad records, long prompts, and a resumable order."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vime_spmd.data.prompts import PromptDataset
from vime_spmd.tools.make_tiny_model import build_tokenizer

# Metadata keys differ between records: parquet stores them as one struct column with the union of the keys.
RECORDS = [{"prompt": f"what is {i} plus {i}", "label": str(2 * i),
            "metadata": {"id": i, "odd": True} if i % 2 else {"id": i}} for i in range(7)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(512, 0)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_jsonl_and_parquet_give_the_same_prompts(tokenizer, tmp_path):
    from_jsonl = PromptDataset(str(write_jsonl(tmp_path / "p.jsonl", RECORDS)), tokenizer)
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "p.parquet")
    from_parquet = PromptDataset(str(tmp_path / "p.parquet"), tokenizer)

    assert len(from_jsonl) == len(from_parquet) == 7
    for a, b in zip(from_jsonl.prompts, from_parquet.prompts, strict=True):
        assert (a.prompt_ids, a.label, a.metadata) == (b.prompt_ids, b.label, b.metadata)
    assert from_jsonl.prompts[3].prompt_ids == ids(tokenizer, "what is 3 plus 3")  # a string is used raw
    assert [p.metadata for p in from_parquet.prompts[:2]] == [{"id": 0}, {"id": 1, "odd": True}]
    assert from_jsonl.prompts[3].source == f"{tmp_path / 'p.jsonl'}:4"
    assert from_parquet.prompts[3].source == f"{tmp_path / 'p.parquet'}:row 4"


def test_dapo_math_schema_loads_with_default_flags_through_the_chat_template(tokenizer, tmp_path):
    record = {"prompt": [{"role": "user", "content": "Find x if x + 1 = 35."}], "label": "34",
              "metadata": {"solution": "34", "source": "dapo"}}
    data = PromptDataset(str(write_jsonl(tmp_path / "dapo.jsonl", [record])), tokenizer)

    (prompt,) = data.prompts
    # ChatML: the user turn, then the opened assistant turn.
    rendered = "<|im_start|>user\nFind x if x + 1 = 35.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.prompt_ids == ids(tokenizer, rendered)
    assert prompt.prompt_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.label == "34"
    assert prompt.metadata == {"solution": "34", "source": "dapo"}


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_verl_format_file_trains_as_it_is_with_dotted_keys(tokenizer, tmp_path, suffix):
    # verl's layout: chat messages under "prompt", the answer nested under reward_model.ground_truth.
    records = [{"data_source": "gsm8k", "prompt": [{"role": "user", "content": f"what is {i} plus {i}"}],
                "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
                "extra_info": {"split": "train", "index": i}} for i in range(3)]
    path = tmp_path / f"verl.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    data = PromptDataset(str(path), tokenizer, label_key="reward_model.ground_truth", metadata_key="extra_info")
    assert [p.label for p in data.prompts] == ["0", "2", "4"]
    assert [p.metadata for p in data.prompts] == [{"split": "train", "index": i} for i in range(3)]
    rendered = "<|im_start|>user\nwhat is 1 plus 1<|im_end|>\n<|im_start|>assistant\n"
    assert data.prompts[1].prompt_ids == ids(tokenizer, rendered)
    # A dotted key that leads nowhere names the key, as a missing top-level key does.
    with pytest.raises(ValueError, match="no 'reward_model.answer' value"):
        PromptDataset(str(path), tokenizer, label_key="reward_model.answer")


def test_apply_chat_template_renders_string_prompts_too(tokenizer, tmp_path):
    path = str(write_jsonl(tmp_path / "p.jsonl", RECORDS[:1]))
    data = PromptDataset(path, tokenizer, apply_chat_template=True)
    assert data.prompts[0].prompt_ids == ids(tokenizer, "<|im_start|>user\nwhat is 0 plus 0<|im_end|>\n"
                                                        "<|im_start|>assistant\n")


def test_messages_without_a_chat_template_name_the_record_and_the_fix(tokenizer, tmp_path):
    plain = build_tokenizer(512, 0)
    plain.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [RECORDS[0], {"prompt": [{"role": "user", "content": "hi"}],
                                                           "label": "x"}])
    with pytest.raises(ValueError, match="chat template") as e:
        PromptDataset(str(path), plain)
    assert f"{path}:2" in str(e.value) and "--hf-checkpoint" in str(e.value)


def test_metadata_key_picks_the_field_and_defaults_to_empty(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "label": 1, "extra": {"bonus": 1.5}},
                                              {"prompt": "b", "label": 2}])
    data = PromptDataset(str(path), tokenizer, metadata_key="extra")
    assert [p.metadata for p in data.prompts] == [{"bonus": 1.5}, {}]
    assert [p.label for p in data.prompts] == ["1", "2"]


def test_bad_json_line_stops_the_run_naming_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [RECORDS[0], '{"prompt": "two", "label": ', RECORDS[1]])
    with pytest.raises(ValueError) as e:
        PromptDataset(str(path), tokenizer)
    message = str(e.value)
    assert message.startswith(f"{path}:2: not valid JSON") and "--skip-bad-records" in message


@pytest.mark.parametrize("record, reason", [
    ('[1, 2]', "a JSON object is expected, got list"),
    ({"question": "q"}, "no 'prompt' value"),
    ({"prompt": 5}, "'prompt' must be a string or a non-empty list"),
    ({"prompt": [{"role": "user"}]}, "'prompt' must be a string or a non-empty list"),
    ({"prompt": "q", "metadata": [1]}, "'metadata' must be an object"),
    ({"prompt": "", "label": "a"}, "the prompt is empty after tokenization"),
    ({"prompt": "q", "answer": "a"}, "no 'label' value (the key is set by --label-key); the record's keys are "
                                     "['answer', 'prompt']"),
])
def test_each_kind_of_malformed_record_is_named(tokenizer, tmp_path, record, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [RECORDS[0], record])
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: {re.escape(reason)}"):
        PromptDataset(str(path), tokenizer)


def test_skip_bad_records_skips_and_counts_them(tokenizer, tmp_path, caplog):
    bad = ['not json', {"prompt": 5}, {"prompt": "q", "metadata": "x"}, {"prompt": "", "label": "a"}, '"a string"',
           {"prompt": "no label"}]
    path = write_jsonl(tmp_path / "p.jsonl", [RECORDS[0], *bad, RECORDS[1]])
    with caplog.at_level(logging.WARNING, logger="vime_spmd.data.prompts"):
        data = PromptDataset(str(path), tokenizer, skip_bad_records=True)
    assert data.num_skipped_bad == 6
    assert [p.label for p in data.prompts] == ["0", "2"]
    assert [p.source for p in data.prompts] == [f"{path}:1", f"{path}:8"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "skipped 6 malformed records" in line and f"{path}:2: not valid JSON" in line


def test_all_records_malformed_is_an_error_even_when_skipping(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q"}, {"question": "r"}])
    with pytest.raises(ValueError, match="all 2 records are malformed.*--input-key"):
        PromptDataset(str(path), tokenizer, skip_bad_records=True)


def test_too_long_prompts_are_dropped_with_a_count(tokenizer, tmp_path, caplog):
    records = [{"prompt": "one two", "label": "a"}, {"prompt": "one two " * 40, "label": "b"},
               {"prompt": "three", "label": "c"}, {"prompt": "four five " * 40, "label": "d"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    limit = 10
    assert len(ids(tokenizer, "one two")) <= limit < len(ids(tokenizer, "one two " * 40))
    with caplog.at_level(logging.WARNING, logger="vime_spmd.data.prompts"):
        data = PromptDataset(str(path), tokenizer, max_prompt_len=limit)
    assert data.num_dropped_too_long == 2
    assert [p.label for p in data.prompts] == ["a", "c"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "dropped 2 prompts" in line and f"{path}:2" in line and "--rollout-max-prompt-len 10" in line


def test_every_prompt_too_long_names_the_flag(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", RECORDS)
    with pytest.raises(ValueError, match="--rollout-max-prompt-len 2"):
        PromptDataset(str(path), tokenizer, max_prompt_len=2)


def test_order_is_a_seeded_shuffle_per_epoch_identical_across_ranks(tokenizer, tmp_path):
    path = str(write_jsonl(tmp_path / "p.jsonl", RECORDS))
    rank0, rank1 = PromptDataset(path, tokenizer, seed=5), PromptDataset(path, tokenizer, seed=5)
    epochs = [[p.label for p in rank0.next_batch(7)] for _ in range(3)]
    assert [[p.label for p in rank1.next_batch(7)] for _ in range(3)] == epochs
    assert all(sorted(e, key=int) == [r["label"] for r in RECORDS] for e in epochs)  # each epoch: all once
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled per epoch (7! orders: a repeat is ~1e-4 likely)
    other_seed = PromptDataset(path, tokenizer, seed=6)
    assert [p.label for p in other_seed.next_batch(7)] != epochs[0]


def test_resume_across_an_epoch_boundary_equals_the_uninterrupted_order(tokenizer, tmp_path):
    path = str(write_jsonl(tmp_path / "p.jsonl", RECORDS))
    uninterrupted = PromptDataset(path, tokenizer, seed=3)
    expected = [p.source for _ in range(6) for p in uninterrupted.next_batch(3)]  # 18 prompts: into epoch 3

    first = PromptDataset(path, tokenizer, seed=3)
    got = [p.source for _ in range(2) for p in first.next_batch(3)]  # stops at 6 of 7, inside epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = PromptDataset(path, tokenizer, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    got += [p.source for _ in range(4) for p in resumed.next_batch(3)]
    assert got == expected


def test_resume_over_a_different_dataset_is_refused(tokenizer, tmp_path):
    state = PromptDataset(str(write_jsonl(tmp_path / "a.jsonl", RECORDS)), tokenizer).state_dict()
    smaller = PromptDataset(str(write_jsonl(tmp_path / "b.jsonl", RECORDS[:3])), tokenizer)
    with pytest.raises(ValueError, match="saved over 7 prompts.*now gives 3"):
        smaller.load_state_dict(state)


def test_missing_file_and_unreadable_parquet_name_the_flag(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--prompt-data .*no such file"):
        PromptDataset(str(tmp_path / "none.jsonl"), tokenizer)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="--prompt-data .*not a readable parquet file"):
        PromptDataset(str(tmp_path / "bad.parquet"), tokenizer)


def test_messages_the_chat_template_refuses_are_malformed_records(tokenizer, tmp_path):
    strict = build_tokenizer(512, 0)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] != 'user' %}"
                            "{{ raise_exception('only user turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "label": "a"},
                                              {"prompt": [{"role": "tool", "content": "x"}], "label": "b"}])
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: the chat template refused .*only user turns"):
        PromptDataset(str(path), strict)
    assert len(PromptDataset(str(path), strict, skip_bad_records=True)) == 1


def test_a_line_that_is_not_utf8_is_named_with_its_line_and_can_be_skipped(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps(RECORDS[0]).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "label": "1"}\n' + json.dumps(RECORDS[1]).encode() + b"\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: not UTF-8 text \\(byte 0xe9 at column 16\\)"):
        PromptDataset(str(path), tokenizer)
    data = PromptDataset(str(path), tokenizer, skip_bad_records=True)
    assert data.num_skipped_bad == 1 and [p.source for p in data.prompts] == [f"{path}:1", f"{path}:3"]


def test_a_byte_order_mark_opening_the_file_is_accepted(tokenizer, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS[:2]).encode())
    assert [p.label for p in PromptDataset(str(path), tokenizer).prompts] == ["0", "2"]


def test_a_compressed_file_given_as_jsonl_is_named_with_the_fix(tokenizer, tmp_path):
    import gzip

    path = tmp_path / "p.jsonl"
    path.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)))
    with pytest.raises(ValueError, match=f"--prompt-data {re.escape(str(path))}: a gzip-compressed file.*gunzip"):
        PromptDataset(str(path), tokenizer, skip_bad_records=True)
