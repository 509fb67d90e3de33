"""The records of a custom generation function (`--custom-generate-function-path`, README "Multi-turn and tools").

A user's function is `async def fn(record, sampling, tokenizer, client) -> Trajectory`: it calls the engine through
`client.generate(token_ids)` (a `Completion` back) as many times as it needs, and returns the response as tokens.
Token in, token out: the model's tokens are kept as the engine sampled them (never decoded and re-tokenized), tool
output is tokenized once by the function, and the trainer trains on exactly `response_ids` where `loss_mask` is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("completed", "truncated", "aborted")


@dataclass
class Request:
    """One engine request of one turn: the whole context so far, its own seed, SamplingParams arguments (n=1)."""

    token_ids: list[int]
    seed: int
    sampling: dict


@dataclass
class Completion:
    """What `client.generate` returns: the sampled tokens, the engine's logprob of each (0.0 when the sampling
    asked for none), and vLLM's finish reason ("stop": end-of-sequence or a stop string/token; "length": the token
    budget)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


@dataclass
class Trajectory:
    """One response to one prompt, built over any number of turns.

    response_ids: every token after the prompt: the model's and the tools'/environment's, in order.
    loss_mask:    one per response token: 1 on the model's tokens (trained on), 0 on the others.
    logprobs:     one per response token: the engine's logprob on the model's tokens (`Completion.logprobs`), 0.0
                  on the others.
    status:       completed, truncated (a token or turn budget ended it; counted in rollout/truncated_ratio) or
                  aborted (kept in its group with reward 0 and no trained token).
    reward:       None: --rm-type (or --custom-rm-path) scores the decoded response; else this reward.
    metadata:     merged over the record's metadata, handed to a custom reward.
    """

    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    status: str = "completed"
    reward: float | None = None
    metadata: dict = field(default_factory=dict)
    num_tool_calls: int = 0
    num_tool_failures: int = 0

    def append(self, token_ids: list[int], logprobs: list[float] | None = None) -> None:
        """Add the model's tokens (with their `logprobs`) or, without logprobs, tool/environment tokens."""
        self.response_ids += token_ids
        self.loss_mask += [1 if logprobs is not None else 0] * len(token_ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(token_ids)

    def problems(self) -> list[str]:
        """What makes this trajectory untrainable (empty: none)."""
        n = len(self.response_ids)
        problems = [f"{name} has {len(values)} entries for {n} response tokens"
                    for name, values in (("loss_mask", self.loss_mask), ("logprobs", self.logprobs))
                    if len(values) != n]
        if n == 0:
            problems.append("the response is empty (return at least one token)")
        if self.status not in STATUSES:
            problems.append(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        if any(m not in (0, 1) for m in self.loss_mask):
            problems.append("loss_mask holds values other than 0 and 1")
        return problems
