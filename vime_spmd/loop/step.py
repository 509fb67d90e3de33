"""One colocated RL step, as named phases with stable timing keys (docs/architecture.md).

    rollout -> engine sleeps -> trainer wakes -> reference logprobs -> actor train
            -> trainer sleeps -> engine wakes weights -> weights sync -> engine wakes KV cache

Every rank runs the same phases. Each engine generates its share of the prompts; the scored samples are
gathered so that every rank holds the whole rollout (small: token ids and floats), computes the same
advantages, and trains on its data-parallel share.
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
from ..rewards import load_custom_reward, score_batch
from ..rollout.filters import keep_groups, load_filter
from ..rollout.sampling import TRAIN_STREAM, request_seeds, rollout_seed
from ..runtime.memory import MemoryManager
from ..sync.weight_sync import WeightSync
from .metrics import StepTimer

TOKEN_LEVEL_ESTIMATORS = ("reinforce_plus_plus",)  # take the KL penalty per token, not summed into the reward
MAX_PROMPTS_PER_STEP_FACTOR = 10  # dynamic sampling gives up after this many rollout batches in one step


class RLStep:
    def __init__(self, cfg: Config, layout: Layout, dataset: PromptDataset, actor, engine,
                 memory: MemoryManager, sync: WeightSync, timer_factory) -> None:
        self.cfg, self.layout, self.dataset = cfg, layout, dataset
        self.actor, self.engine, self.memory, self.sync = actor, engine, memory, sync
        self.new_timer = timer_factory
        d, r = cfg.data, cfg.rollout
        self.custom_reward = load_custom_reward(d.custom_rm_path) if d.custom_rm_path else None
        self.group_filter = load_filter(r.dynamic_sampling_filter_path) if r.dynamic_sampling_filter_path else None
        self.rollout_seed = rollout_seed(cfg)
        self.last_batch: RolloutBatch | None = None  # the latest step's samples, for sample logging

    def run(self, step: int) -> dict:
        timer: StepTimer = self.new_timer()
        with timer.span("perf/step_time"):
            batch = self.last_batch = self.collect(timer)
            with timer.span("perf/engine_sleep_time"):
                self.memory.engine_sleep()
            with timer.span("perf/train_wake_time"):
                self.memory.train_wake()
            train_metrics = self.train_phases(batch, timer)
            with timer.span("perf/sleep_time"):
                self.memory.train_sleep()
            with timer.span("perf/wake_up_time"):
                self.memory.engine_wake_weights()
            with timer.span("perf/update_weights_time"):
                self.sync.update(self.memory)
            with timer.span("perf/wake_up_time"):
                self.memory.engine_wake_kv()
        record = {"step": step, **timer.times, **self.memory.metrics(), **self.batch_metrics(batch),
                  **train_metrics, "data/position": float(self.dataset.position)}
        self.memory.reset_readings()
        return record

    def collect(self, timer: StepTimer) -> RolloutBatch:
        """The step's samples, while the engine is awake."""
        with timer.span("perf/rollout_time"):
            return self.rollout()

    def train_phases(self, batch: RolloutBatch, timer: StepTimer) -> dict:
        """The trainer's phases on `batch`, while it is awake; returns the training metrics."""
        inputs, step_slices = self.train_inputs(batch)
        with timer.span("perf/ref_logprobs_time"):
            if self.actor.ref_model is not None:
                inputs.ref_logprobs = self.logprobs(inputs, reference=True)
        with timer.span("perf/actor_train_time"):
            return self.train(batch, inputs, step_slices)

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        return rollout_metrics(batch)

    def prime_engine(self, while_trainer_awake: Callable[[], None] | None = None) -> None:
        """Load the trainer's current weights into the engine outside a step (after resuming from a checkpoint, or
        when the engine started with dummy weights), through the same transitions a step uses; with
        `while_trainer_awake` (a checkpoint save), call it while the trainer's memory is resumed."""
        self.memory.engine_sleep()
        self.memory.train_wake()
        if while_trainer_awake is not None:
            while_trainer_awake()
        self.memory.train_sleep()
        self.memory.engine_wake_weights()
        self.sync.update(self.memory)
        self.memory.engine_wake_kv()
        self.memory.reset_readings()  # these readings belong to no step

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
        """Generate and score this engine's share of `num_prompts` prompts, then gather every engine's samples
        on every rank, in engine order."""
        r, d = self.cfg.rollout, self.cfg.data
        first = self.dataset.position
        prompts = self.dataset.next_batch(num_prompts)
        share = self.layout.engine_slice(len(prompts))
        mine = prompts[share]
        seeds = request_seeds(self.rollout_seed, TRAIN_STREAM, range(first + share.start, first + share.stop))
        samples = self.engine.generate([p.prompt_ids for p in mine], [p.label for p in mine], seeds)
        for i, sample in enumerate(samples):
            sample.metadata = mine[i // r.n_samples_per_prompt].metadata
        scores, failures = score_batch([s.response_text for s in samples], [s.label for s in samples], d.rm_type,
                                       metadata=[s.metadata for s in samples], custom_fn=self.custom_reward,
                                       timeout_s=d.reward_timeout_s)
        for sample, score in zip(samples, scores):
            sample.raw_reward = score
            sample.reward = score + overlong_penalty(len(sample.response_ids), r.rollout_max_response_len,
                                                     r.overlong_buffer_len, r.overlong_penalty_factor)
        shared = (samples, failures) if self.layout.is_engine_leader else None
        gathered: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(gathered, shared)
        parts = [g for g in gathered if g is not None]
        return RolloutBatch([s for part, _ in parts for s in part], r.n_samples_per_prompt,
                            num_reward_failures=sum(f for _, f in parts))

    # ---- training --------------------------------------------------------------------------------------

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

    def optimizer_steps(self, inputs: TrainInputs, step_slices: list[tuple[slice, float]]) -> dict[str, float]:
        """One optimizer step per slice of `inputs`; their metrics as `train/` keys, averaged over the steps."""
        per_step = [self.actor.train_step(inputs.rows(rows), denominator) for rows, denominator in step_slices]
        return {f"train/{k}": statistics.fmean(m[k] for m in per_step) for k in per_step[0]}


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
    }


class SFTStep(RLStep):
    """One step of supervised fine-tuning (`--loss-type sft`) in the colocated loop: the next
    `--rollout-batch-size` records' responses are the samples (no rollout, no reward), the actor minimises their
    negative log-likelihood (prompt tokens masked), and the new weights reach the engine as after an RL step, so that
    evaluations and `--save-hf` see them. Phases and timing keys are the RL step's; the rollout phase is empty."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ..config.checks import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.model.hf_checkpoint)
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
