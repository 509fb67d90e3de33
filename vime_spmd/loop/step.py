"""One colocated step, as named phases with stable timing keys (docs/architecture.md).

    rollout -> engine sleeps -> trainer wakes -> reference logprobs -> actor train
            -> trainer sleeps -> engine wakes weights -> weights sync -> engine wakes KV cache

`Step.run` holds that sequence once; `RLStep` and `SFTStep` are its two kinds (what is collected, how it is trained
on). Every rank runs the same phases. Each engine generates its share of the prompts; the scored samples are
gathered so that every rank holds the whole rollout (small: token ids and floats), computes the same advantages,
and trains on its data-parallel share.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..algorithms import compute_advantages, kl_penalty
from ..algorithms.shaping import overlong_penalty
from ..batch import RolloutBatch, Sample, TrainInputs
from ..config import Config
from ..data.prompts import PromptDataset
from ..parallel import Layout
from ..rollout.filters import keep_groups, load_filter
from ..rollout.generate import RolloutGenerator
from ..rollout.record import load_rollout, save_rollout
from ..rollout.sampling import TRAIN_STREAM
from ..runtime.memory import MemoryManager
from ..sync.weight_sync import WeightSync
from .metrics import StepTimer

TOKEN_LEVEL_ESTIMATORS = ("reinforce_plus_plus",)  # take the KL penalty per token, not summed into the reward
MAX_PROMPTS_PER_STEP_FACTOR = 10  # dynamic sampling gives up after this many rollout batches in one step


class Step:
    """The phase sequence of every step, RL or supervised: collect the samples while the engine is awake, hand the
    memory to the trainer, run the trainer's phases, hand it back with the new weights synced into the engine.
    `RLStep` and `SFTStep` say what is collected, how it is trained on and what is recorded."""

    def __init__(self, cfg: Config, layout: Layout, dataset: PromptDataset, actor, memory: MemoryManager,
                 sync: WeightSync, timer_factory: Callable[[], StepTimer]) -> None:
        self.cfg, self.layout, self.dataset = cfg, layout, dataset
        self.actor, self.memory, self.sync = actor, memory, sync
        self.new_timer = timer_factory
        self.last_batch: RolloutBatch | None = None  # the latest step's samples, for sample logging

    def run(self, step: int) -> dict:
        self.step_number = step
        timer = self.new_timer()
        with timer.span("perf/step_time"):
            batch = self.last_batch = self.collect(timer)
            self.memory.to_trainer(timer.span)
            train_metrics = self.train_phases(batch, timer)
            self.memory.to_engine(self.sync, timer.span)
        record = {"step": step, **timer.times, **self.memory.metrics(), **self.batch_metrics(batch),
                  **train_metrics, "data/position": float(self.dataset.position)}
        self.memory.reset_readings()
        return record

    def prime_engine(self, while_trainer_awake: Callable[[], None] | None = None) -> None:
        """Load the trainer's current weights into the engine outside a step (after resuming from a checkpoint, or
        when the engine started with dummy weights), through the same hand-offs a step makes; with
        `while_trainer_awake` (a checkpoint save), call it while the trainer's memory is resumed."""
        self.memory.to_trainer()
        if while_trainer_awake is not None:
            while_trainer_awake()
        self.memory.to_engine(self.sync)
        self.memory.reset_readings()  # these readings belong to no step

    def train_inputs(self, batch: RolloutBatch) -> tuple[TrainInputs, list[tuple[slice, float]]]:
        """This rank's samples and, per optimizer step, the rows (of this rank's samples) it trains on and the
        loss denominator: tokens (or sequences) of the optimizer step over all data-parallel ranks."""
        per_token = self.cfg.algorithm.calculate_per_token_loss
        mask = batch.response_mask()
        gbs = self.cfg.global_batch_size
        rows = self.layout.train_rows(len(batch), gbs)
        per_step = gbs // self.layout.dp_size
        step_slices = []
        for k, start in enumerate(range(0, len(batch), gbs)):
            denominator = mask[start : start + gbs].sum().item() if per_token else float(gbs)
            step_slices.append((slice(k * per_step, (k + 1) * per_step), denominator))
        index = torch.tensor(rows)
        inputs = TrainInputs(samples=[batch.samples[i] for i in rows], batch_rows=rows, response_mask=mask[index],
                             rollout_logprobs=batch.rollout_logprobs()[index])
        return inputs, step_slices

    def optimizer_steps(self, inputs: TrainInputs, step_slices: list[tuple[slice, float]]) -> dict[str, float]:
        """One optimizer step per slice of `inputs`; their metrics as `train/` keys, averaged over the steps."""
        per_step = [self.actor.train_step(inputs.rows(rows), denominator) for rows, denominator in step_slices]
        return {f"train/{k}": statistics.fmean(m[k] for m in per_step) for k in per_step[0]}

    def collect(self, timer: StepTimer) -> RolloutBatch:
        """The step's samples, while the engine is awake."""
        raise NotImplementedError

    def train_phases(self, batch: RolloutBatch, timer: StepTimer) -> dict[str, float]:
        """The trainer's phases on `batch`, while it is awake; returns the training metrics."""
        raise NotImplementedError

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        raise NotImplementedError


class RLStep(Step):
    """One RL step: a rollout (with dynamic sampling: rounds until enough groups pass the filter), reference and
    old-policy logprobs, advantages over the whole rollout, and the policy-gradient optimizer steps."""

    def __init__(self, *args, generator: RolloutGenerator, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generator = generator
        path = self.cfg.rollout.dynamic_sampling_filter_path
        self.group_filter = load_filter(path) if path else None

    def collect(self, timer: StepTimer) -> RolloutBatch:
        """The rollout, or with --load-debug-rollout-data the recorded one (and the data position after it); with
        --save-debug-rollout-data rank 0 records it."""
        r = self.cfg.rollout
        with timer.span("perf/rollout_time"):
            if r.load_debug_rollout_data:
                batch, self.dataset.position = load_rollout(r.load_debug_rollout_data, self.step_number)
            else:
                batch = self.rollout()
        if r.save_debug_rollout_data and self.layout.rank == 0:
            save_rollout(r.save_debug_rollout_data, self.step_number, batch, self.dataset.position)
        return batch

    def train_phases(self, batch: RolloutBatch, timer: StepTimer) -> dict[str, float]:
        inputs, step_slices = self.train_inputs(batch)
        with timer.span("perf/ref_logprobs_time"):
            if self.actor.ref_model is not None:
                inputs.ref_logprobs = self.logprobs(inputs, reference=True)
        with timer.span("perf/actor_train_time"):
            return self.train(batch, inputs, step_slices)

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        return rollout_metrics(batch)

    # ---- rollout ---------------------------------------------------------------------------------------

    def rollout(self) -> RolloutBatch:
        """The step's samples: one round, or with dynamic sampling, rounds until enough groups are kept."""
        r = self.cfg.rollout
        if self.group_filter is None:
            return self.generate_round(r.rollout_batch_size)
        n, wanted = r.n_samples_per_prompt, r.rollout_batch_size
        kept: list[Sample] = []
        dropped = failures = prompts_used = 0
        while len(kept) < wanted * n:
            if prompts_used >= MAX_PROMPTS_PER_STEP_FACTOR * wanted:
                raise RuntimeError(
                    f"dynamic sampling kept {len(kept) // n} of {wanted} groups from {prompts_used} prompts: the "
                    f"filter {r.dynamic_sampling_filter_path} drops almost every group; check the reward "
                    f"(--rm-type) or relax the filter")
            round_size = r.over_sampling_batch_size or wanted
            part = self.generate_round(round_size)
            prompts_used += round_size
            keep = keep_groups([s.reward for s in part.samples], n, self.group_filter)
            kept += [s for g in keep for s in part.samples[g * n : (g + 1) * n]]
            dropped += round_size - len(keep)
            failures += part.num_reward_failures
        return RolloutBatch(kept[: wanted * n], n, num_reward_failures=failures, num_dropped_groups=dropped)

    def generate_round(self, num_prompts: int) -> RolloutBatch:
        """The next `num_prompts` prompts' scored samples (every engine's, on every rank), each prompt's request
        seeded by its position in the data stream, and their rewards shaped (overlong penalty)."""
        r = self.cfg.rollout
        first = self.dataset.position
        scored = self.generator.run(self.dataset.next_batch(num_prompts), TRAIN_STREAM, first)
        for sample in scored.samples:
            sample.reward = sample.raw_reward + overlong_penalty(len(sample.response_ids), r.rollout_max_response_len,
                                                                 r.overlong_buffer_len, r.overlong_penalty_factor)
        return RolloutBatch(scored.samples, r.n_samples_per_prompt, num_reward_failures=scored.num_reward_failures)

    # ---- training --------------------------------------------------------------------------------------

    def logprobs(self, inputs: TrainInputs, reference: bool = False) -> torch.Tensor:
        logp = self.actor.compute_logprobs(inputs.samples, reference=reference)
        return F.pad(logp, (0, inputs.response_mask.size(1) - logp.size(1)))

    def advantages(self, batch: RolloutBatch, inputs: TrainInputs) -> torch.Tensor:
        """Advantages of this rank's rows, computed over the whole rollout (groups span data-parallel ranks)."""
        a = self.cfg.algorithm
        rewards, kl = batch.rewards(), None
        if a.kl_coef > 0:
            local = a.kl_coef * kl_penalty(inputs.old_logprobs, inputs.ref_logprobs, a.kl_loss_type)
            kl = self.assemble_over_dp(local * inputs.response_mask, len(batch))
            if a.advantage_estimator not in TOKEN_LEVEL_ESTIMATORS:
                rewards, kl = rewards - kl.sum(dim=1), None
        advantages = compute_advantages(a.advantage_estimator, rewards, batch.group_size, batch.response_mask(),
                                        normalize_std=not a.disable_grpo_std_normalization, kl=kl)
        return advantages[torch.tensor(inputs.batch_rows)]

    def assemble_over_dp(self, local: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[B, R] from every data-parallel rank's [N, R] rows (each rank computed only its own)."""
        parts = self.actor.gather_over_dp(local)
        full = torch.zeros(batch_size, local.size(1))
        for dp_rank, part in enumerate(parts):
            full[torch.tensor(self.layout.train_rows(batch_size, self.cfg.global_batch_size, dp_rank))] = part
        return full

    def train(self, batch: RolloutBatch, inputs: TrainInputs, step_slices: list[tuple[slice, float]]) -> dict:
        inputs.old_logprobs = self.logprobs(inputs)
        mask = inputs.response_mask
        abs_diff = (inputs.old_logprobs - inputs.rollout_logprobs).abs() * mask
        totals = self.actor.sum_over_dp({"abs_diff": abs_diff.sum().item(), "tokens": mask.sum().item()})
        max_diff = self.actor.sum_over_dp({"max": abs_diff.max().item()}, op=torch.distributed.ReduceOp.MAX)
        inputs.advantages = self.advantages(batch, inputs)
        metrics = self.optimizer_steps(inputs, step_slices)
        metrics["train/train_rollout_logprob_abs_diff"] = totals["abs_diff"] / max(totals["tokens"], 1.0)
        metrics["train/train_rollout_logprob_max_abs_diff"] = max_diff["max"]
        metrics["train/param_norm"] = self.actor.param_norm()
        return metrics


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    lengths = [len(s.response_ids) for s in batch.samples]
    return {
        "rollout/raw_reward": statistics.fmean(s.raw_reward for s in batch.samples),
        "rollout/reward": statistics.fmean(s.reward for s in batch.samples),
        "rollout/response_len": statistics.fmean(lengths),
        "rollout/truncated_ratio": statistics.fmean(float(s.truncated) for s in batch.samples),
        "rollout/reward_failures": float(batch.num_reward_failures),
        "rollout/dynamic_sampling_dropped_groups": float(batch.num_dropped_groups),
        "rollout/num_samples": float(len(batch)),
        "rollout/turns_mean": statistics.fmean(s.num_turns for s in batch.samples),
        "rollout/tool_calls_mean": statistics.fmean(s.num_tool_calls for s in batch.samples),
        "rollout/tool_failures": float(sum(s.num_tool_failures for s in batch.samples)),
    }


class SFTStep(Step):
    """One step of supervised fine-tuning (`--loss-type sft`) in the colocated loop: the next
    `--rollout-batch-size` records' responses are the samples (no rollout, no reward), the actor minimises their
    negative log-likelihood (prompt tokens masked), and the new weights reach the engine as after an RL step, so that
    evaluations and `--save-hf` see them. Phases and timing keys are the RL step's; the rollout phase is empty."""

    def __init__(self, *args, tokenizer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_token_id

    def collect(self, timer: StepTimer) -> RolloutBatch:
        return self.records_batch()

    def train_phases(self, batch: RolloutBatch, timer: StepTimer) -> dict:
        inputs, step_slices = self.train_inputs(batch)
        with timer.span("perf/actor_train_time"):
            metrics = self.optimizer_steps(inputs, step_slices)
        return metrics | {"train/param_norm": self.actor.param_norm()}

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        return {"train/response_len": statistics.fmean(len(s.response_ids) for s in batch.samples),
                "train/truncated_ratio": statistics.fmean(float(s.truncated) for s in batch.samples)}

    def records_batch(self) -> RolloutBatch:
        """The next records as samples: the prompt's tokens, then the response's and end-of-sequence, cut at
        `--rollout-max-response-len` tokens (counted in train/truncated_ratio)."""
        limit = self.cfg.rollout.rollout_max_response_len
        prompts = self.dataset.next_batch(self.cfg.rollout.rollout_batch_size)
        texts = [p.label for p in prompts]
        samples = []
        for prompt, text, ids in zip(prompts, texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
            ids = [*ids, self.eos_id]
            samples.append(Sample(prompt.prompt_ids, ids[:limit], [0.0] * min(len(ids), limit), label=text,
                                  response_text=text, truncated=len(ids) > limit, metadata=prompt.metadata))
        return RolloutBatch(samples, group_size=1)
