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

from ..config import Config, eval_sets
from ..data.prompts import PromptDataset
from ..rollout.generate import RolloutGenerator
from ..rollout.sampling import TRAIN_STREAM, eval_sampling


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
    def __init__(self, cfg: Config, generator: RolloutGenerator, sets: list[EvalSet]) -> None:
        self.cfg, self.generator, self.sets = cfg, generator, sets
        self.sampling = eval_sampling(cfg)

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
            samples = self.generator.run(prompts, stream=TRAIN_STREAM + 1 + k, sampling=self.sampling).samples
            rewards = [[s.raw_reward for s in samples[i * n : (i + 1) * n]] for i in range(len(prompts))]
            record.update(set_metrics(eval_set.name, rewards, [len(s.response_ids) for s in samples],
                                      [s.truncated for s in samples]))
            sample_records += [{"step": step, "set": eval_set.name, "source": prompts[i // n].source,
                                "prompt_index": i // n, "sample_index": i % n, "reward": s.raw_reward,
                                "response_len": len(s.response_ids), "truncated": s.truncated}
                               for i, s in enumerate(samples)]
        record["perf/eval_time"] = time.perf_counter() - start
        return record, sample_records
