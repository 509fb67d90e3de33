"""Every bad input of a run is refused by `prepare`, before any model or engine work, naming the input and the fix.

(tests/integration/test_bad_input.py runs some of these under torchrun: one `error:` line per job, exit code 2.)
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from vime_spmd.config import parse_config
from vime_spmd.config.checks import check_model_dir
from vime_spmd.loop import checkpoint
from vime_spmd.loop.prepare import prepare

GOOD_RECORDS = [{"prompt": "write a", "label": "a"}, {"prompt": "write b", "label": "b"}]


@pytest.fixture
def world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD_RECORDS))
    return path


def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def run_prepare(model: Path, data: Path, *flags: str):
    """The training dataset `prepare` returns (no eval sets are asked for here)."""
    dataset, eval_sets = prepare(parse_config(["--hf-checkpoint", str(model), "--prompt-data", str(data),
                                               "--log-dir", str(data.parent / "logs"), *flags]))
    assert eval_sets == []
    return dataset


def refused(model: Path, data: Path, *flags: str) -> str:
    with pytest.raises(ValueError) as error:
        run_prepare(model, data, *flags)
    return str(error.value)


def test_good_inputs_pass_and_nothing_is_written(world_of_one, tiny_model, data, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    dataset = run_prepare(tiny_model, data, "--save", str(tmp_path / "new" / "ckpt"))
    assert len(dataset) == 2
    assert sorted(tmp_path.rglob("*")) == before  # the write probes were removed; no folder was created


def test_a_record_without_its_label_stops_naming_file_and_line_or_is_skipped_and_counted(world_of_one, tiny_model,
                                                                                       data):
    data.write_text(data.read_text() + json.dumps({"prompt": "write c", "answer": "c"}) + "\n")
    message = refused(tiny_model, data)
    assert message.startswith(f"{data}:3: no 'label' value") and "--skip-bad-records" in message
    dataset = run_prepare(tiny_model, data, "--skip-bad-records")
    assert len(dataset) == 2 and dataset.num_skipped_bad == 1


def test_a_byte_that_is_not_utf8_names_file_and_line(world_of_one, tiny_model, data):
    data.write_bytes(data.read_bytes() + b'{"prompt": "\xff", "label": "x"}\n')
    assert refused(tiny_model, data).startswith(f"{data}:3: not UTF-8 text (byte 0xff")


def test_a_gzipped_file_given_as_jsonl_is_named(world_of_one, tiny_model, data):
    data.write_bytes(gzip.compress(data.read_bytes()))
    assert refused(tiny_model, data) == (f"--prompt-data {data}: a gzip-compressed file, not jsonl text; decompress "
                                         "it first (gunzip) and give the .jsonl")


@pytest.mark.parametrize("flag", ["--save", "--log-dir"])
def test_an_output_folder_that_cannot_be_created_is_named(world_of_one, tiny_model, data, tmp_path, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = refused(tiny_model, data, flag, str(blocker / "sub"))
    assert message == f"{flag} {blocker / 'sub'}: {blocker} is a file, not a folder; choose another path"


def test_an_output_folder_on_a_read_only_filesystem_is_named(world_of_one, tiny_model, data):
    read_only = Path("/proc/vime-spmd-test")  # procfs refuses new files, even to root
    message = refused(tiny_model, data, "--save", str(read_only))
    assert message.startswith(f"--save {read_only}: cannot write there (it does not exist yet, and its parent /proc "
                              "is not writable)")


@pytest.mark.parametrize("flags,expected", [
    (["--rm-type", "nonsense"], "argument --rm-type: invalid choice: 'nonsense' (choose from 'math', 'dapo', "
                                "'deepscaler', 'letter', 'custom', 'remote')"),
    (["--custom-rm-path", "no_such_module.reward"], "--custom-rm-path='no_such_module.reward': cannot import "
                                                    "'no_such_module'"),
    (["--custom-rm-path", "json.dumps"], "--custom-rm-path='json.dumps': the function takes"),
    (["--dynamic-sampling-filter-path", "no_such_module.keep"], "--dynamic-sampling-filter-path="),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--eps-clip", "0"], "--eps-clip 0.0: must be > 0"),
    (["--rollout-max-prompt-len", "0"], "--rollout-max-prompt-len 0: must be >= 1"),
])
def test_bad_reward_and_out_of_range_flags_are_refused(world_of_one, tiny_model, data, flags, expected):
    assert refused(tiny_model, data, *flags).startswith(expected)


def test_a_custom_reward_with_the_right_parameters_loads(world_of_one, tiny_model, data, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text("def score(response, label, metadata):\n    return 1.0\n")
    assert len(run_prepare(tiny_model, data, "--custom-rm-path", f"{reward}:score")) == 2


def test_a_model_folder_without_weights_is_named(world_of_one, tiny_model, data, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    (model / "model.safetensors").unlink()
    assert refused(model, data).startswith(f"--hf-checkpoint {model}: no weights inside")


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_corrupt_safetensors_file_is_named(world_of_one, tiny_model, data, tmp_path, damage):
    model = model_copy(tiny_model, tmp_path)
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\0" * len(raw))
    message = refused(model, data)
    assert message.startswith(f"--hf-checkpoint {weights}: not a valid safetensors file")
    assert message.endswith("download it again")


def test_a_shard_named_by_the_index_but_missing_is_named(world_of_one, tiny_model, data, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names 1 missing weight file(s), e.g. model-00002-of-00002.safetensors" in refused(model, data)


def test_a_model_folder_without_tokenizer_files_is_named(world_of_one, tiny_model, data, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    assert refused(model, data).startswith(f"--hf-checkpoint {model}: no tokenizer files")


def test_a_checkpoint_folder_missing_files_is_refused(world_of_one, tiny_model, data, tmp_path):
    ckpt = tmp_path / "ckpt"
    folder = checkpoint.iteration_dir(ckpt, 4)
    (folder / "rng").mkdir(parents=True)
    (ckpt / checkpoint.LATEST).write_text("4")
    meta = {"format": checkpoint.FORMAT, "step": 4, "data": {}, "layout": {"world_size": 2}}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / checkpoint.MEGATRON_METADATA).write_text("{}")
    (folder / "rng" / "rank_00000.pt").write_bytes(b"")
    assert "lacks 1 of its files (first: rng/rank_00001.pt)" in refused(tiny_model, data, "--load", str(ckpt))


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(tmp_path):
    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ValueError, match=r"--hf-checkpoint .*moe: model_type 'qwen3_moe' is not supported; "
                                         r"supported: llama, qwen2, qwen3$"):
        check_model_dir(str(model), "--hf-checkpoint", tokenizer=True)


def test_the_supported_model_types_are_the_families_the_backend_converts():
    from vime_spmd.train.megatron import MODEL_TYPES
    from vime_spmd.train.megatron.families import FAMILIES

    assert sorted(t for f in FAMILIES.values() for t in f.model_types) == list(MODEL_TYPES)
