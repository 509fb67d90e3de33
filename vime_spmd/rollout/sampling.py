"""What the engine is asked to sample, for training and for evaluation, and the seed of every request.

Every request carries its own seed. vLLM then draws its sampling noise from a generator of that request alone, so
a request's samples depend on its seed and the weights only: not on what else is in the batch, not on earlier calls
(the engine's guard restores torch's global RNG after each call, so without seeds every call on CPU replays the same
noise), and not on evaluation requests generated in between. A seed is a function of (rollout seed, stream, index):
training requests use stream 0 and their prompt's position in the data stream (so a resumed run samples what the
uninterrupted one would, and the engine layout does not matter); eval set k uses stream k + 1 and the prompt's index
in the set, the same at every eval, so successive evals compare checkpoints on common random numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..config import Config

TRAIN_STREAM = 0


def request_seeds(rollout_seed: int, stream: int, indices: Iterable[int]) -> list[int]:
    """One 31-bit seed per index. vLLM seeds the i-th of a request's n samples with seed + i; random 31-bit seeds
    make overlaps between requests negligible."""
    return [int(np.random.SeedSequence([rollout_seed, stream, index]).generate_state(1)[0] >> 1)
            for index in indices]


def turn_seed(trajectory_seed: int, turn: int) -> int:
    """The seed of a multi-turn trajectory's `turn`-th engine call (rollout/turns.py): the trajectory's own seed for
    the first, so that a one-turn custom function samples what the plain rollout would."""
    if turn == 0:
        return trajectory_seed
    return int(np.random.SeedSequence([trajectory_seed, turn]).generate_state(1)[0] >> 1)


def rollout_seed(cfg: Config) -> int:
    return cfg.train.seed if cfg.rollout.rollout_seed is None else cfg.rollout.rollout_seed


def _common(cfg: Config) -> dict:
    r = cfg.rollout
    return {"top_k": max(r.rollout_top_k, 0),  # vLLM: 0 disables top-k
            "stop": list(r.rollout_stop or []), "stop_token_ids": list(r.rollout_stop_token_ids or [])}


def training_sampling(cfg: Config) -> dict:
    """SamplingParams arguments of a training rollout: the sampled tokens' logprobs are needed."""
    r = cfg.rollout
    return {"n": r.n_samples_per_prompt, "temperature": r.rollout_temperature, "top_p": r.rollout_top_p,
            "max_tokens": r.rollout_max_response_len, "logprobs": 0, **_common(cfg)}


def eval_sampling(cfg: Config) -> dict:
    """SamplingParams arguments of an evaluation: the eval flags, each defaulting to its rollout flag; no logprobs."""
    r, e = cfg.rollout, cfg.eval
    return {"n": e.n_samples_per_eval_prompt,
            "temperature": r.rollout_temperature if e.eval_temperature is None else e.eval_temperature,
            "top_p": r.rollout_top_p if e.eval_top_p is None else e.eval_top_p,
            "max_tokens": e.eval_max_response_len or r.rollout_max_response_len, "logprobs": None, **_common(cfg)}


def max_response_len(cfg: Config) -> int:
    """The longest response any request may ask for (the engine's context is sized for it)."""
    return max(cfg.rollout.rollout_max_response_len, cfg.eval.eval_max_response_len or 0)
