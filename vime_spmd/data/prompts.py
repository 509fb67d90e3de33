"""Prompt datasets: jsonl or parquet records -> token ids, labels and metadata, in a seeded, resumable order.

Every rank reads the whole file and walks the same order, so no communication is needed to agree on a batch;
each engine then takes its share of the batch (`Layout.engine_slice`).

A record is an object with a prompt (a string, or a list of chat messages such as the dapo-math-17k schema), a
label (the reference answer) and optional metadata (a dict handed to custom rewards). Records are named
"file:line" (jsonl) or "file:row N" (parquet, 1-based) in errors and logs.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SKIP_FIX = "fix the record, or pass --skip-bad-records to skip and count such records"
TOKENIZE_CHUNK = 1024  # prompts per tokenizer call: batched calls are much faster than one per prompt
# Files that are read as text by mistake: (leading bytes, what they are, the fix).
COMPRESSED = ((b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip) and give the .jsonl"),
              (b"(\xb5/\xfd", "zstd-compressed", "decompress it first (zstd -d) and give the .jsonl"),
              (b"PAR1", "parquet", "name it with the .parquet suffix"))


@dataclass(frozen=True)
class Prompt:
    prompt_ids: list[int]
    label: str
    source: str  # "file:line" or "file:row N", to name the record in errors and logs
    metadata: dict = field(default_factory=dict)  # the record's --metadata-key value, for custom rewards


@dataclass(frozen=True)
class RecordKeys:
    input_key: str = "prompt"
    label_key: str = "label"
    metadata_key: str = "metadata"
    label_flag: str = "--label-key"  # the flag that names label_key (--response-key for supervised fine-tuning)


class MalformedRecord(Exception):
    """A record that cannot become a prompt; `reason` says why (the caller adds where, and the fix)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) per record of a jsonl or `.parquet` file; a jsonl line that is not JSON comes back as a
    `MalformedRecord`, so that the caller decides whether it stops the run."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompt-data {path}: no such file; give a jsonl or .parquet file of prompt records")
    if file.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with file.open("rb") as f:
        magic = f.read(4)
    for signature, kind, fix in COMPRESSED:
        if magic.startswith(signature):
            raise ValueError(f"--prompt-data {path}: a {kind} file, not jsonl text; {fix}")
    with file.open("rb") as f:  # bytes, so that a line that is not UTF-8 is named like any other bad line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                yield f"{path}:{number}", MalformedRecord(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                          f"{e.start + 1}); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{number}", MalformedRecord(f"not valid JSON ({e.msg}); each line must be one object")


def _read_parquet(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"--prompt-data {path}: not a readable parquet file ({e}); "
                         "give a parquet file, or a jsonl file without the .parquet suffix") from None
    row = 0
    for batch in table.iter_batches(batch_size=TOKENIZE_CHUNK):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", _without_null_fields(record)


def _without_null_fields(value: object) -> object:
    """A parquet struct column has the union of its rows' keys, null where a row lacks one; drop those, so that
    a row reads as the jsonl record it came from (a custom reward's `metadata.get(key, default)` works)."""
    if isinstance(value, dict):
        return {k: _without_null_fields(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_null_fields(v) for v in value]
    return value


def lookup(record: dict, key: str) -> object:
    """`record[key]`, or for a dotted key such as `reward_model.ground_truth` (verl's layout) the value nested under
    it; None when absent. A key that itself holds a dot is taken whole first."""
    if key in record:
        return record[key]
    value: object = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_record(record: object, keys: RecordKeys) -> tuple[str | list[dict], str, dict]:
    """(prompt, label, metadata) of one record. Raises MalformedRecord."""
    if isinstance(record, MalformedRecord):
        raise record
    if not isinstance(record, dict):
        raise MalformedRecord(f"a JSON object is expected, got {type(record).__name__}")
    prompt = lookup(record, keys.input_key)
    if prompt is None:
        raise MalformedRecord(f"no {keys.input_key!r} value (the key is set by --input-key); "
                              f"the record's keys are {sorted(record)}")
    if not (isinstance(prompt, str) or _is_messages(prompt)):
        raise MalformedRecord(f"{keys.input_key!r} must be a string or a non-empty list of "
                              f"{{role, content}} messages with string values, got {type(prompt).__name__}")
    label = lookup(record, keys.label_key)
    if label is not None and not isinstance(label, str | int | float):
        raise MalformedRecord(f"{keys.label_key!r} must be a string or a number, got {type(label).__name__}; "
                              f"{keys.label_flag} names its key")
    metadata = lookup(record, keys.metadata_key)
    if metadata is not None and not isinstance(metadata, dict):
        raise MalformedRecord(f"{keys.metadata_key!r} must be an object (a dict), got {type(metadata).__name__}; "
                              "--metadata-key names the key of the custom-reward metadata")
    if label is None:  # every reward scores against it: a run without labels would train on zeros
        raise MalformedRecord(f"no {keys.label_key!r} value (the key is set by {keys.label_flag}); "
                              f"the record's keys are {sorted(record)}")
    return prompt, str(label), metadata or {}


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def render(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], apply_chat_template: bool,
           where: str) -> str:
    """The prompt text: chat messages always go through the chat template; a string only with the flag."""
    if isinstance(prompt, str) and not apply_chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        why = "is a list of chat messages" if isinstance(prompt, list) else "is to be rendered (--apply-chat-template)"
        raise ValueError(f"{where}: the prompt {why}, but the tokenizer of --hf-checkpoint has no chat template; "
                         "use a checkpoint whose tokenizer_config.json has a chat_template, or give string prompts "
                         "without --apply-chat-template")
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        raise MalformedRecord(f"the chat template refused the messages ({e})") from None


class PromptDataset:
    """The usable prompts of a file, and a position in an endless, per-epoch seeded shuffle of them.

    Malformed records stop the construction with "where: reason; fix" unless `skip_bad_records`, which counts
    them in `num_skipped_bad`. Prompts longer than `max_prompt_len` tokens are counted in `num_dropped_too_long`.
    """

    def __init__(self, path: str, tokenizer: PreTrainedTokenizerBase, *, input_key: str = "prompt",
                 label_key: str = "label", metadata_key: str = "metadata", apply_chat_template: bool = False,
                 max_prompt_len: int | None = None, seed: int = 0, skip_bad_records: bool = False,
                 label_flag: str = "--label-key") -> None:
        self.skip_bad_records = skip_bad_records
        self.num_skipped_bad = 0
        self.num_dropped_too_long = 0
        self._first_bad: str | None = None
        self._first_too_long: str | None = None
        keys = RecordKeys(input_key, label_key, metadata_key, label_flag)
        pending: list[tuple[str, str, str, dict]] = []  # (text, label, where, metadata), awaiting tokenization
        self.prompts: list[Prompt] = []
        for where, record in read_records(path):
            try:
                prompt, label, metadata = parse_record(record, keys)
                pending.append((render(tokenizer, prompt, apply_chat_template, where), label, where, metadata))
            except MalformedRecord as e:
                if not skip_bad_records:  # records before this one are checked first, so the first bad one is named
                    self._tokenize(tokenizer, pending, max_prompt_len)
                self._bad(where, e.reason)
            if len(pending) == TOKENIZE_CHUNK:
                self._tokenize(tokenizer, pending, max_prompt_len)
                pending = []
        self._tokenize(tokenizer, pending, max_prompt_len)
        self._report_and_check(path, max_prompt_len)
        self.seed = seed
        self.position = 0  # prompts consumed so far, over all epochs
        self._order_cache: tuple[int, list[int]] = (-1, [])

    def _bad(self, where: str, reason: str) -> None:
        if not self.skip_bad_records:
            raise ValueError(f"{where}: {reason}; {SKIP_FIX}")
        self.num_skipped_bad += 1
        if self._first_bad is None:
            self._first_bad = f"{where}: {reason}"

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, pending: list[tuple[str, str, str, dict]],
                  max_prompt_len: int | None) -> None:
        if not pending:
            return
        all_ids = tokenizer([text for text, *_ in pending], add_special_tokens=False)["input_ids"]
        for ids, (_, label, where, metadata) in zip(all_ids, pending, strict=True):
            if not ids:
                self._bad(where, "the prompt is empty after tokenization")
            elif max_prompt_len is not None and len(ids) > max_prompt_len:
                if self.num_dropped_too_long == 0:
                    self._first_too_long = f"{where} ({len(ids)} tokens)"
                self.num_dropped_too_long += 1
            else:
                self.prompts.append(Prompt(list(ids), label, where, metadata))

    def _report_and_check(self, path: str, max_prompt_len: int | None) -> None:
        """One warning line per kind of record left out; an error when none is left."""
        if self.num_skipped_bad:
            logger.warning("--prompt-data %s: skipped %d malformed records (--skip-bad-records); the first: %s",
                           path, self.num_skipped_bad, self._first_bad)
        if self.num_dropped_too_long:
            logger.warning("--prompt-data %s: dropped %d prompts longer than --rollout-max-prompt-len %s tokens; "
                           "the first: %s", path, self.num_dropped_too_long, max_prompt_len, self._first_too_long)
        if self.prompts:
            return
        if self.num_dropped_too_long:
            raise ValueError(f"--prompt-data {path}: every usable prompt is longer than --rollout-max-prompt-len "
                             f"{max_prompt_len} tokens (the first: {self._first_too_long}); raise the limit")
        if self.num_skipped_bad:
            raise ValueError(f"--prompt-data {path}: all {self.num_skipped_bad} records are malformed (the first: "
                             f"{self._first_bad}); check --input-key, --label-key and --metadata-key")
        raise ValueError(f"--prompt-data {path}: the file holds no records; give a file with one record or more")

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation: a function of (seed, epoch) only, so every rank and every resume agree."""
        if self._order_cache[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def next_batch(self, batch_size: int) -> list[Prompt]:
        """The next `batch_size` prompts; epochs roll over with a new seeded shuffle."""
        batch = []
        while len(batch) < batch_size:
            epoch, offset = divmod(self.position, len(self.prompts))
            batch.append(self.prompts[self._order(epoch)[offset]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved dataset stood. The saved seed wins over the constructor's, so that the
        order stays the one the run started with."""
        num_prompts = state.get("num_prompts", len(self.prompts))
        if num_prompts != len(self.prompts):
            raise ValueError(f"the checkpoint's data position was saved over {num_prompts} prompts, but --prompt-data "
                             f"now gives {len(self.prompts)}; resume with the same --prompt-data, "
                             "--rollout-max-prompt-len and --skip-bad-records")
        self.position, self.seed = state["position"], state["seed"]
        self._order_cache = (-1, [])
