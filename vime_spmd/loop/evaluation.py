"""Held-out evaluation during training: the same in-process engines generate, the same rewards score.

Every eval set's prompts are split over the engines (each rank of an engine generates with its engine), scored
with the run's reward, and gathered on every rank; rank 0 records the metrics and the per-sample scores. An eval
runs between steps, when the engine is awake and the trainer asleep, and runs no training phase. It leaves the
training run's trajectory as it was: its requests carry their own seeds (`rollout/sampling.py`), it draws no
prompt from the training data, and the engine call restores the process RNGs.

Metrics per set NAME: `eval/NAME/accuracy` (mean reward over all samples), `eval/NAME/pass@k` for k = 1, 2, 4, ...
up to `--n-samples-per-eval-prompt` (the unbiased estimator, averaged over prompts), `eval/NAME/response_len`,
`eval/NAME/truncated_ratio`; `perf/eval_time` is the whole eval's wall time.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from ..config import Config, eval_sets
from ..data.prompts import PromptDataset
from ..parallel import Layout
from ..rewards import load_custom_reward, score_batch
from ..rollout.sampling import TRAIN_STREAM, eval_sampling, request_seeds, rollout_seed


def is_correct(reward: float) -> bool:
    """pass@k's notion of a correct sample: a positive reward (the rules score a right answer 1, a wrong one 0, or
    -1 under dapo; the letter task's partial credit counts as correct once any of it is earned)."""
    return reward > 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples drawn without replacement from n, of which c
    are correct, is correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n."""
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]


def set_metrics(name: str, rewards: list[list[float]], lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    """The metrics of one eval set: `rewards` holds each prompt's n sample rewards."""
    n = len(rewards[0])
    flat = [r for group in rewards for r in group]
    metrics = {f"eval/{name}/accuracy": statistics.fmean(flat),
               f"eval/{name}/response_len": statistics.fmean(lengths),
               f"eval/{name}/truncated_ratio": statistics.fmean(float(t) for t in truncated)}
    for k in pass_ks(n):
        metrics[f"eval/{name}/pass@{k}"] = statistics.fmean(
            pass_at_k(n, sum(map(is_correct, group)), k) for group in rewards)
    return metrics


def is_eval_step(step: int, interval: int | None, last_step: int) -> bool:
    """Whether an eval follows `step`: every `interval` steps and after the last (the trainer also evaluates before
    the first step of a run that does not resume)."""
    return step == last_step or (interval is not None and step % interval == 0)


def engine_share(num_items: int, layout: Layout) -> slice:
    """This rank's engine's contiguous share of `num_items`, remainder spread over the first engines (an eval set
    need not divide by the number of engines)."""
    e, engines = layout.engine_index, layout.num_engines
    return slice(e * num_items // engines, (e + 1) * num_items // engines)


@dataclass
class EvalSet:
    name: str
    dataset: PromptDataset


def load_eval_sets(cfg: Config, tokenizer) -> list[EvalSet]:
    """Read and tokenize every --eval-prompt-data set (before any work: a bad file stops the run here)."""
    from pathlib import Path

    d, sets = cfg.data, []
    for name, path in eval_sets(cfg.eval):
        if not Path(path).is_file():
            raise ValueError(f"--eval-prompt-data {name} {path}: no such file; give a jsonl or .parquet file")
        sets.append(EvalSet(name, PromptDataset(path, tokenizer, input_key=d.input_key, label_key=d.label_key,
                                                metadata_key=d.metadata_key, apply_chat_template=d.apply_chat_template,
                                                max_prompt_len=cfg.rollout.rollout_max_prompt_len,
                                                skip_bad_records=d.skip_bad_records)))
    return sets


class Evaluator:
    def __init__(self, cfg: Config, layout: Layout, engine, sets: list[EvalSet]) -> None:
        self.cfg, self.layout, self.engine, self.sets = cfg, layout, engine, sets
        self.sampling = eval_sampling(cfg)
        self.seed = rollout_seed(cfg)
        path = cfg.data.custom_rm_path
        self.custom_reward = load_custom_reward(path) if path else None

    def due(self, step: int) -> bool:
        return is_eval_step(step, self.cfg.eval.eval_interval, self.cfg.train.num_rollout)

    def run(self, step: int) -> tuple[dict, list[dict]]:
        """(metrics record, per-sample records) of every set at `step`; identical on every rank."""
        start = time.perf_counter()
        record: dict = {"step": step}
        sample_records: list[dict] = []
        n = self.sampling["n"]
        for k, eval_set in enumerate(self.sets):
            prompts = eval_set.dataset.prompts
            scored = self.generate(prompts, stream=TRAIN_STREAM + 1 + k)
            rewards = [[reward for reward, _, _ in scored[i * n : (i + 1) * n]] for i in range(len(prompts))]
            record.update(set_metrics(eval_set.name, rewards, [length for _, length, _ in scored],
                                      [truncated for _, _, truncated in scored]))
            sample_records += [{"step": step, "set": eval_set.name, "source": prompts[i // n].source,
                                "prompt_index": i // n, "sample_index": i % n, "reward": reward,
                                "response_len": length, "truncated": truncated}
                               for i, (reward, length, truncated) in enumerate(scored)]
        record["perf/eval_time"] = time.perf_counter() - start
        return record, sample_records

    def generate(self, prompts: list, stream: int) -> list[tuple[float, int, bool]]:
        """(reward, response length, truncated) of every prompt's samples, in prompt order, on every rank: each
        engine generates and scores its share; only these numbers travel."""
        d, n = self.cfg.data, self.sampling["n"]
        share = engine_share(len(prompts), self.layout)
        mine = prompts[share]
        seeds = request_seeds(self.seed, stream, range(share.start, share.stop))
        # An engine with no prompts still calls generate: vLLM's data-parallel engines step together (each step
        # all-reduces whether any engine has work left), so skipping the call would hang the others.
        samples = self.engine.generate([p.prompt_ids for p in mine], [p.label for p in mine], seeds,
                                       self.sampling)
        scores, _ = score_batch([s.response_text for s in samples], [s.label for s in samples], d.rm_type,
                                metadata=[mine[i // n].metadata for i in range(len(samples))],
                                custom_fn=self.custom_reward, timeout_s=d.reward_timeout_s)
        scored = [(score, len(s.response_ids), s.truncated) for s, score in zip(samples, scores)]
        gathered: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(gathered, scored if self.layout.is_engine_leader else None)
        return [item for part in gathered if part is not None for item in part]
