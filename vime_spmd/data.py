"""Prompt datasets: jsonl records -> token ids and labels, in a seeded, resumable order.

Every rank reads the whole file and walks the same order, so no communication is needed to agree on a batch;
each engine then takes its share of the batch (`Layout.engine_slice`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    prompt_ids: list[int]
    label: str
    source: str  # "file:line", to name the record in errors and logs


def read_jsonl(path: str, input_key: str, label_key: str) -> list[tuple[object, str, str]]:
    """(prompt, label, "file:line") per record. A malformed record stops the run naming file and line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompt-data {path}: no such file; give a jsonl file of prompt records")
    records = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a JSON object is expected, got {type(record).__name__}")
            if input_key not in record:
                raise ValueError(f"{where}: no {input_key!r} key (set by --input-key); keys are {sorted(record)}")
            prompt = record[input_key]
            if not (isinstance(prompt, str) or _is_messages(prompt)):
                raise ValueError(f"{where}: {input_key!r} must be a string or a list of {{role, content}} messages")
            label = record.get(label_key, "")
            records.append((prompt, "" if label is None else str(label), where))
    if not records:
        raise ValueError(f"--prompt-data {path}: the file holds no records")
    return records


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


class PromptDataset:
    def __init__(self, path: str, tokenizer, *, input_key: str = "prompt", label_key: str = "label",
                 apply_chat_template: bool = False, max_prompt_len: int | None = None, seed: int = 0) -> None:
        self.prompts = []
        for prompt, label, where in read_jsonl(path, input_key, label_key):
            ids = self._tokenize(tokenizer, prompt, apply_chat_template, where)
            if max_prompt_len is not None and len(ids) > max_prompt_len:
                raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than --rollout-max-prompt-len "
                                 f"{max_prompt_len}; raise the limit or shorten the prompt")
            self.prompts.append(Prompt(ids, label, where))
        self.seed = seed
        self.position = 0  # prompts consumed so far, over all epochs

    @staticmethod
    def _tokenize(tokenizer, prompt, apply_chat_template: bool, where: str) -> list[int]:
        if apply_chat_template:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise ValueError(f"{where}: the prompt is a list of chat messages; add --apply-chat-template")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{where}: the prompt is empty after tokenization")
        return ids

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> list[Prompt]:
        """The next `batch_size` prompts; epochs roll over with a new seeded shuffle."""
        batch = []
        while len(batch) < batch_size:
            epoch, offset = divmod(self.position, len(self.prompts))
            batch.append(self.prompts[self._order(epoch)[offset]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = state["position"], state["seed"]
