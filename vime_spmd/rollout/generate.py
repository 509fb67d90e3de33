"""The one generate-and-score path, for training rollouts and evaluations alike.

    prompts -> this engine's share -> seeded requests -> the engine's samples -> rewards -> every engine's samples,
    on every rank, in engine order

`RolloutGenerator.run` is the seam later kinds of rollout plug into: a custom generation function (several engine
calls per trajectory) or a partial rollout replaces `generate_share`, and keeps the rest: the split over engines,
the seeds, the scoring and the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import Sample
from ..data.prompts import Prompt
from ..parallel import Layout
from ..rewards import load_custom_reward, score_batch
from .sampling import request_seeds


@dataclass
class Scorer:
    """The run's reward (`--rm-type`, `--custom-rm-path` or `--rm-url`, under `--reward-timeout-s`), loaded once."""

    rm_type: str
    timeout_s: float
    custom_fn: object = None
    url: str | None = None
    tokenizer: object = None  # decodes the prompts sent to --rm-url

    @classmethod
    def of(cls, data, tokenizer=None) -> Scorer:
        """From the data section of the config (and, for --rm-url, the policy's tokenizer)."""
        custom = load_custom_reward(data.custom_rm_path) if data.custom_rm_path else None
        return cls(data.rm_type, data.reward_timeout_s, custom, data.rm_url, tokenizer)

    def score(self, samples: list[Sample]) -> int:
        """Set each sample's `raw_reward` (its `given_reward` when it has one); returns how many rewards failed (they
        score 0)."""
        todo = [s for s in samples if s.given_reward is None]
        prompts = ([self.tokenizer.decode(s.prompt_ids) for s in todo]
                   if self.url and self.tokenizer is not None else None)
        scores, failures = score_batch([s.response_text for s in todo], [s.label for s in todo], self.rm_type,
                                       metadata=[s.metadata for s in todo], custom_fn=self.custom_fn,
                                       timeout_s=self.timeout_s, url=self.url, prompts=prompts)
        for sample, score in zip(todo, scores):
            sample.raw_reward = score
        for sample in samples:
            if sample.given_reward is not None:
                sample.raw_reward = sample.given_reward
        return failures


@dataclass
class Scored:
    """Every engine's scored samples (each prompt's contiguous, prompts in order) and the reward failures."""

    samples: list[Sample]
    num_reward_failures: int


class RolloutGenerator:
    def __init__(self, engine, layout: Layout, scorer: Scorer, seed: int) -> None:
        self.engine, self.layout, self.scorer, self.seed = engine, layout, scorer, seed

    def run(self, prompts: list[Prompt], stream: int, first_index: int = 0, sampling: dict | None = None) -> Scored:
        """Generate and score `prompts` (the same list on every rank). Prompt i's request is seeded from (seed,
        `stream`, `first_index` + i), so its samples depend on neither the engine layout nor the other requests;
        `sampling`: SamplingParams arguments (default: the training rollout's)."""
        share = self.layout.engine_slice(len(prompts))
        mine = prompts[share]
        seeds = request_seeds(self.seed, stream, range(first_index + share.start, first_index + share.stop))
        samples = self.generate_share(mine, seeds, sampling)
        failures = self.scorer.score(samples)
        return self.gather(samples, failures)

    def generate_share(self, prompts: list[Prompt], seeds: list[int], sampling: dict | None) -> list[Sample]:
        """This engine's samples of its `prompts`, each carrying its prompt's metadata. An engine with no prompts
        still calls the engine: vLLM's data-parallel engines step together (each step all-reduces whether any
        engine has work left), so skipping the call would hang the others."""
        samples = self.engine.generate([p.prompt_ids for p in prompts], [p.label for p in prompts], seeds, sampling)
        per_prompt = len(samples) // len(prompts) if prompts else 0
        for i, sample in enumerate(samples):
            sample.metadata = prompts[i // per_prompt].metadata
        return samples

    def gather(self, samples: list[Sample], failures: int) -> Scored:
        """Every engine's samples on every rank, in engine order (one rank speaks for each engine)."""
        gathered: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(gathered, (samples, failures) if self.layout.is_engine_leader else None)
        parts = [g for g in gathered if g is not None]
        return Scored([s for part, _ in parts for s in part], sum(f for _, f in parts))
