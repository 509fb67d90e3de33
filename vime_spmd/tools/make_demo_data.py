"""Write the demo task: prompts asking for one letter, repeated; the `letter` reward scores the share of it.

    python -m vime_spmd.tools.make_demo_data runs/demo/letters.jsonl

A freshly initialised tiny model already writes the asked letter now and then, so every GRPO group has some
reward variance from the first step, and the reward can visibly rise within a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Two letters: the policy first learns to write one of them (the reward plateaus near 0.5), then to read the
# prompt and write the one asked for (the reward reaches ~1).
LETTERS = "ao"
TEMPLATES = ("Write the letter {c} many times.", "Say {c} again and again.", "Repeat the letter {c}.",
             "Answer with the letter {c} only.", "Give me a long row of {c}.", "Type {c} until you stop.",
             "Only the letter {c}, please.", "Fill the line with {c}.")


def demo_records() -> list[dict]:
    return [{"prompt": t.format(c=c), "label": c} for c in LETTERS for t in TEMPLATES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="jsonl file to write")
    out = Path(parser.parse_args(argv).out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in demo_records()))
    print(f"{len(demo_records())} demo prompts written to {out}")


if __name__ == "__main__":
    main()
