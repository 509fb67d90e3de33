"""One colocated RL step, as named phases with stable timing keys (design.md).

    rollout -> engine sleeps -> trainer wakes -> reference logprobs -> actor train
            -> trainer sleeps -> engine wakes weights -> weights sync -> engine wakes KV cache

Every rank runs the same phases. Each engine generates its share of the prompts; the scored samples are
gathered so that every rank holds the whole rollout (small: token ids and floats), computes the same
advantages, and trains on its data-parallel share.
"""

from __future__ import annotations

import statistics

import torch

from .algorithms import compute_advantages
from .batch import RolloutBatch, Sample, TrainInputs
from .config import Config
from .data import PromptDataset
from .memory import MemoryManager
from .metrics import StepTimer
from .parallel import Layout
from .rewards import score_batch


class RLStep:
    def __init__(self, cfg: Config, layout: Layout, dataset: PromptDataset, actor, engine,
                 memory: MemoryManager, timer_factory) -> None:
        self.cfg, self.layout, self.dataset = cfg, layout, dataset
        self.actor, self.engine, self.memory = actor, engine, memory
        self.new_timer = timer_factory

    def run(self, step: int) -> dict:
        timer: StepTimer = self.new_timer()
        with timer.span("perf/step_time"):
            with timer.span("perf/rollout_time"):
                batch = self.rollout()
            with timer.span("perf/engine_sleep_time"):
                self.memory.engine_sleep()
            with timer.span("perf/train_wake_time"):
                self.memory.train_wake()
            inputs, step_slices = self.train_inputs(batch)
            with timer.span("perf/ref_logprobs_time"):
                if self.cfg.algorithm.use_kl_loss:
                    inputs.ref_logprobs = self.actor.compute_logprobs(inputs.samples, reference=True)
            with timer.span("perf/actor_train_time"):
                train_metrics = self.train(inputs, step_slices)
            with timer.span("perf/sleep_time"):
                self.memory.train_sleep()
            with timer.span("perf/wake_up_time"):
                self.memory.engine_wake_weights()
            with timer.span("perf/update_weights_time"):
                self.engine.load_weights(self.actor.hf_weights())
            with timer.span("perf/wake_up_time"):
                self.memory.engine_wake_kv()
        return {"step": step, **timer.times, **rollout_metrics(batch), **train_metrics}

    # ---- phases ----------------------------------------------------------------------------------------

    def rollout(self) -> RolloutBatch:
        """Generate and score this engine's prompts, then gather every engine's samples on every rank."""
        prompts = self.dataset.next_batch(self.cfg.rollout.rollout_batch_size)
        mine = prompts[self.layout.engine_slice(len(prompts))]
        samples = self.engine.generate([p.prompt_ids for p in mine], [p.label for p in mine])
        scores, failures = score_batch([s.response_text for s in samples], [s.label for s in samples],
                                       self.cfg.data.rm_type)
        for sample, reward in zip(samples, scores):
            sample.reward = reward
        shared = (samples, failures) if self.layout.is_engine_leader else None
        gathered: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(gathered, shared)
        parts = [g for g in gathered if g is not None]  # engine leaders, in engine order
        all_samples: list[Sample] = [s for part, _ in parts for s in part]
        return RolloutBatch(all_samples, self.cfg.rollout.n_samples_per_prompt,
                            num_reward_failures=sum(f for _, f in parts))

    def train_inputs(self, batch: RolloutBatch) -> tuple[TrainInputs, list[tuple[slice, float]]]:
        """Advantages over the whole rollout; this rank's samples; and per optimizer step, the rows (of this
        rank's samples) it trains on and the loss denominator over all data-parallel ranks."""
        a = self.cfg.algorithm
        mask = batch.response_mask()
        advantages = compute_advantages(a.advantage_estimator, batch.rewards(), batch.group_size, mask,
                                        normalize_std=not a.disable_grpo_std_normalization)
        gbs = self.cfg.global_batch_size
        rows, step_slices = [], []
        for start in range(0, len(batch), gbs):
            mine = self.layout.dp_slice(gbs)
            picked = list(range(start + mine.start, start + mine.stop))
            step_mask = mask[start : start + gbs]
            denominator = step_mask.sum().item() if a.calculate_per_token_loss else float(gbs)
            step_slices.append((slice(len(rows), len(rows) + len(picked)), denominator))
            rows.extend(picked)
        index = torch.tensor(rows)
        inputs = TrainInputs(samples=[batch.samples[i] for i in rows], response_mask=mask[index],
                             advantages=advantages[index], rollout_logprobs=batch.rollout_logprobs()[index])
        return inputs, step_slices

    def train(self, inputs: TrainInputs, step_slices: list[tuple[slice, float]]) -> dict[str, float]:
        inputs.old_logprobs = self.actor.compute_logprobs(inputs.samples)
        width = inputs.old_logprobs.size(1)
        mask = inputs.response_mask[:, :width]
        abs_diff = ((inputs.old_logprobs - inputs.rollout_logprobs[:, :width]).abs() * mask).sum().item()
        totals = self.actor.sum_over_dp({"abs_diff": abs_diff, "tokens": mask.sum().item()})
        per_step = [self.actor.train_step(inputs.rows(rows), denominator) for rows, denominator in step_slices]
        metrics = {f"train/{k}": statistics.fmean(m[k] for m in per_step) for k in per_step[0]}
        metrics["train/train_rollout_logprob_abs_diff"] = totals["abs_diff"] / max(totals["tokens"], 1.0)
        metrics["train/param_norm"] = self.actor.param_norm()
        return metrics


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    rewards = [s.reward for s in batch.samples]
    lengths = [len(s.response_ids) for s in batch.samples]
    return {
        "rollout/raw_reward": statistics.fmean(rewards),
        "rollout/response_len": statistics.fmean(lengths),
        "rollout/truncated_ratio": statistics.fmean(float(s.truncated) for s in batch.samples),
        "rollout/reward_failures": float(batch.num_reward_failures),
        "rollout/num_samples": float(len(batch)),
    }
