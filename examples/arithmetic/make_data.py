"""Write the arithmetic task: addition of numbers up to three digits, answered column by column, then boxed.

    python examples/arithmetic/make_data.py runs/arithmetic/data

    prompt:   What is 347 + 28?
    response: 7+8=15. 4+2+1=7. 3+0=3. \\boxed{375}

Each column's sum is written out, the carry of the column before added in (4+2+1), and the answer is boxed, so the
`math` reward scores it. Files (jsonl, one record per line):
- train.jsonl: prompt, response (for the supervised warm start, --response-key response) and label (for GRPO);
- heldout.jsonl: problems of the same kind whose operand pairs never appear in train.jsonl;
- hard.jsonl: three-digit plus three-digit with at least two carries, operand pairs also never in train.jsonl.
An operand pair (a, b) is held out when a stable hash of it falls in one tenth of the range: train and eval are
disjoint by construction, and the same arguments give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path


def column_steps(a: int, b: int) -> list[str]:
    """The column sums of a + b, units first: "7+8=15", then the next column with the carry added ("4+2+1=7")."""
    steps, carry, column = [], 0, 0
    while a >= 10**column or b >= 10**column or column == 0:
        x, y = a // 10**column % 10, b // 10**column % 10
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
        carry, column = total // 10, column + 1
    return steps


def solution(a: int, b: int) -> str:
    return " ".join(f"{step}." for step in column_steps(a, b)) + f" \\boxed{{{a + b}}}"


def num_carries(a: int, b: int) -> int:
    return sum(int(step.split("=")[1]) >= 10 for step in column_steps(a, b))


def held_out(a: int, b: int) -> bool:
    """One pair in ten, by a hash that does not depend on Python's per-process string hashing."""
    return hashlib.sha256(f"{a}+{b}".encode()).digest()[0] % 10 == 0


def operand(rng: random.Random) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def record(a: int, b: int, with_response: bool) -> dict:
    r = {"prompt": f"What is {a} + {b}?", "label": str(a + b)}
    if with_response:
        r["response"] = solution(a, b)
    return r


def make(num_train: int, num_eval: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train, heldout, hard, seen = [], [], [], set()
    while len(train) < num_train or len(heldout) < num_eval:
        a, b = operand(rng), operand(rng)
        if held_out(a, b):
            if len(heldout) < num_eval and (a, b) not in seen:
                heldout.append(record(a, b, with_response=False))
                seen.add((a, b))
        elif len(train) < num_train:
            train.append(record(a, b, with_response=True))
    while len(hard) < num_eval:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if held_out(a, b) and num_carries(a, b) >= 2 and (a, b) not in seen:
            hard.append(record(a, b, with_response=False))
            seen.add((a, b))
    return {"train": train, "heldout": heldout, "hard": hard}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for train.jsonl, heldout.jsonl and hard.jsonl")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=128, help="problems per eval set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in make(args.num_train, args.num_eval, args.seed).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(records)} {name} records written to {out / name}.jsonl")


if __name__ == "__main__":
    main()
