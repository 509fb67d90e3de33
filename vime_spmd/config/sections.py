"""The config's sections, one frozen dataclass per component; each owns its flags and checks them.

Each field is one flag: `rollout_batch_size` is `--rollout-batch-size`. A field's `help` metadata is its
documentation. A section's `check()` returns the problems of its own flags, each naming the flag, the problem and
the fix; rules across sections live in `Config.check_across` (config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The rule-based rewards (vime_spmd.rewards), `custom`, the function of --custom-rm-path, and `remote`, the server of
# --rm-url. One list: the flag's choices and the rewards' dispatch.
RM_TYPES = ("math", "dapo", "deepscaler", "letter", "custom", "remote")
# The observe extra's install line, named wherever a dashboard package is missing.
OBSERVE_EXTRA = "pip install 'vime-spmd[observe]'"
EVAL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def must(flag: str, value: Any, ok: bool, wanted: str) -> list[str]:
    """No problem when `ok`; else the one problem: the flag, its value, and what it must be."""
    return [] if ok else [f"{flag} {value}: must be {wanted}"]


def at_least_one(flags: dict[str, int | None]) -> list[str]:
    """Counts and sizes that mean nothing below 1 (None: not given)."""
    return [f"{flag} {value}: must be at least 1" for flag, value in flags.items() if value is not None and value < 1]


class Section:
    """A config section: its fields are flags; `check` returns the problems of those flags alone."""

    def check(self) -> list[str]:
        return []


# Megatron-LM's --attention-backend values (what slime scripts pass) and the backend of ours that does that job.
ATTENTION_BACKEND_ALIASES = {"flash": "sdpa", "fused": "sdpa", "auto": "sdpa", "unfused": "local"}


def opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig(Section):
    hf_checkpoint: str = opt(None, "HF model directory: architecture, tokenizer and initial weights", required=True)
    ref_load: str | None = opt(None, "the reference model for KL: an HF folder, or a torch_dist checkpoint (a --save "
                                     "folder or one of its iter_* folders); default: the initial weights")


@dataclass(frozen=True)
class ParallelConfig(Section):
    device: str = opt("auto", "accelerator: auto, cpu, cuda or npu", choices=["auto", "cpu", "cuda", "npu"])
    tensor_model_parallel_size: int = opt(1, "training tensor-parallel size")
    pipeline_model_parallel_size: int = opt(1, "training pipeline-parallel size (stages of layers)")
    decoder_first_pipeline_num_layers: int | None = opt(None, "layers of the first pipeline stage (default: an even "
                                                              "split, or an automatic one when uneven)")
    decoder_last_pipeline_num_layers: int | None = opt(None, "layers of the last pipeline stage (default: as above)")
    sequence_parallel: bool = opt(False, "split activations outside the tensor-parallel layers along the sequence "
                                         "(needs --tensor-model-parallel-size > 1)")
    make_vocab_size_divisible_by: int = opt(1, "pad the Megatron vocabulary to a multiple of this (times the TP size)")
    rollout_num_gpus_per_engine: int = opt(1, "ranks per vLLM engine (the engine's tensor-parallel size)")
    colocate: bool = opt(True, "training and rollout share the same devices (the only mode)")
    weight_sync_transport: str = opt("auto", "how training shards reach the engines: shm (shared memory within a "
                                             "node), collective (process groups), or auto",
                                     choices=["auto", "shm", "collective"])
    weight_sync_format: str = opt("auto", "how weights enter the engine: direct (each engine rank copies its own "
                                          "share into the engine's tensors), reload (full HF tensors through "
                                          "vLLM's reload_weights), or auto (direct on CPU and CUDA, reload on NPU)",
                                  choices=["auto", "direct", "reload"])
    update_weight_buffer_size: int = opt(512 << 20, "bytes of weights handed to the engine per call during sync")

    def check(self) -> list[str]:
        problems = [*at_least_one({"--tensor-model-parallel-size": self.tensor_model_parallel_size,
                                   "--rollout-num-gpus-per-engine": self.rollout_num_gpus_per_engine,
                                   "--pipeline-model-parallel-size": self.pipeline_model_parallel_size}),
                    *must("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by,
                          self.make_vocab_size_divisible_by >= 1, ">= 1"),
                    *must("--update-weight-buffer-size", self.update_weight_buffer_size,
                          self.update_weight_buffer_size > 0, "> 0 bytes")]
        if not self.colocate:
            problems.append("--no-colocate: vime-spmd always colocates training and rollout; drop the flag")
        if not problems and self.sequence_parallel and self.tensor_model_parallel_size < 2:
            problems.append("--sequence-parallel splits activations over tensor-parallel ranks: it needs "
                            "--tensor-model-parallel-size > 1; raise it or drop the flag")
        return problems


@dataclass(frozen=True)
class RolloutConfig(Section):
    rollout_batch_size: int = opt(8, "prompts per rollout step (over all engines)")
    n_samples_per_prompt: int = opt(4, "responses generated per prompt (the GRPO group)")
    rollout_temperature: float = opt(1.0, "sampling temperature")
    rollout_top_p: float = opt(1.0, "nucleus sampling threshold")
    rollout_max_response_len: int = opt(64, "most tokens generated per response")
    rollout_max_prompt_len: int = opt(256, "longest prompt in tokens; sets the engine's max_model_len with the above")
    over_sampling_batch_size: int | None = opt(None, "prompts generated per round when dynamic sampling "
                                                     "filters groups (default: --rollout-batch-size)")
    dynamic_sampling_filter_path: str | None = opt(None, "DAPO dynamic sampling: keep a group when fn(rewards) is "
                                                         "true, e.g. check_reward_nonzero_std or module.function")
    overlong_buffer_len: int = opt(0, "DAPO overlong penalty: the last tokens before --rollout-max-response-len "
                                      "over which the penalty grows (0: off)")
    overlong_penalty_factor: float = opt(1.0, "DAPO overlong penalty at --rollout-max-response-len")
    vllm_load_format: str = opt("auto", "the engine's first weights: auto (read from --hf-checkpoint) or dummy (not "
                                        "read; the trainer's weights are synced in before the first rollout)",
                                choices=["auto", "dummy"])
    vllm_kv_cache_bytes: int = opt(256 << 20, "KV-cache size per engine rank on CPU, in bytes")
    vllm_gpu_memory_utilization: float = opt(0.5, "fraction of device memory for vLLM on accelerators")
    vllm_enable_sleep_mode: bool = opt(True, "start the engine with vLLM sleep mode on accelerators, so that it hands "
                                             "its memory to the trainer (on by default: --colocate is the only mode)")
    rollout_top_k: int = opt(-1, "sample from the k most likely tokens only (-1: all)")
    rollout_stop: list[str] | None = opt(None, "strings that end a response (not included in the response text)")
    rollout_stop_token_ids: list[int] | None = opt(None, "token ids that end a response, besides end-of-sequence")
    rollout_seed: int | None = opt(None, "seed of the engines' sampling (default: --seed); each request is seeded "
                                         "from it and its prompt's position in the data stream")
    save_debug_rollout_data: str | None = opt(None, "write each step's rollout (tokens, masks, engine logprobs, "
                                                    "rewards) to this path, with {rollout_id} for the step, e.g. "
                                                    "rollouts/{rollout_id}.pt (rank 0)")
    load_debug_rollout_data: str | None = opt(None, "train on rollouts written by --save-debug-rollout-data (the "
                                                    "same {rollout_id} path) instead of generating: no engine starts")
    custom_generate_function_path: str | None = opt(
        None, "multi-turn rollouts: async fn(record, sampling, tokenizer, client) -> Trajectory, as "
              "package.module.function or path/to/file.py:function, called once per response; it calls the engine "
              "through client.generate as often as it needs (README: Multi-turn and tools)")
    max_turns: int | None = opt(None, "the built-in tool loop: at most this many model turns per response, tools "
                                      "called from <tool_call> JSON between them (with --tools)")
    tools: list[str] | None = opt(None, "the tool loop's tools: functions fn(**arguments) -> str, called by their "
                                        "names, as package.module.function or path/to/file.py:function",
                                  metavar="FN")
    tool_timeout_s: float = opt(10.0, "a tool call slower than this returns an error observation (counted in "
                                      "rollout/tool_failures)")

    def check(self) -> list[str]:
        """The ranges first; the rules between this section's flags only when those passed (no cascade)."""
        problems = self._ranges()
        if problems:
            return problems
        for flag, path in (("--save-debug-rollout-data", self.save_debug_rollout_data),
                           ("--load-debug-rollout-data", self.load_debug_rollout_data)):
            if path is not None and "{rollout_id}" not in path:
                problems.append(f"{flag} {path}: the path needs {{rollout_id}}, the step's number (one file per "
                                "step), e.g. rollouts/{rollout_id}.pt")
        if self.tools and self.max_turns is None:
            problems.append("--tools needs --max-turns N (the tool loop); add it")
        if self.max_turns is not None and self.custom_generate_function_path is not None:
            problems.append("--max-turns selects the built-in tool loop and --custom-generate-function-path names "
                            "another generation function; keep one")
        if not 0 <= self.overlong_buffer_len < self.rollout_max_response_len:
            problems.append(f"--overlong-buffer-len {self.overlong_buffer_len}: must be in [0, "
                            f"--rollout-max-response-len {self.rollout_max_response_len})")
        if self.over_sampling_batch_size is not None and self.dynamic_sampling_filter_path is None:
            problems.append("--over-sampling-batch-size only applies with --dynamic-sampling-filter-path; add one")
        return problems

    def _ranges(self) -> list[str]:
        ids = self.rollout_stop_token_ids
        return [*at_least_one({"--rollout-batch-size": self.rollout_batch_size,
                               "--n-samples-per-prompt": self.n_samples_per_prompt,
                               "--rollout-max-response-len": self.rollout_max_response_len}),
                *must("--rollout-max-prompt-len", self.rollout_max_prompt_len, self.rollout_max_prompt_len >= 1,
                      ">= 1"),
                *must("--rollout-top-p", self.rollout_top_p, 0 < self.rollout_top_p <= 1, "in (0, 1]"),
                *must("--rollout-temperature", self.rollout_temperature, self.rollout_temperature > 0,
                      "> 0 (logprobs need sampling)"),
                *must("--over-sampling-batch-size", self.over_sampling_batch_size,
                      self.over_sampling_batch_size is None or self.over_sampling_batch_size >= 1,
                      "a positive multiple of the engines"),
                *must("--overlong-penalty-factor", self.overlong_penalty_factor, self.overlong_penalty_factor >= 0,
                      ">= 0"),
                *must("--vllm-kv-cache-bytes", self.vllm_kv_cache_bytes, self.vllm_kv_cache_bytes > 0, "> 0"),
                *must("--vllm-gpu-memory-utilization", self.vllm_gpu_memory_utilization,
                      0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]"),
                *must("--rollout-top-k", self.rollout_top_k, self.rollout_top_k == -1 or self.rollout_top_k >= 1,
                      "-1 (all tokens) or at least 1"),
                *([f"--rollout-stop-token-ids {ids}: token ids are >= 0"] if ids and min(ids) < 0 else []),
                *(["--rollout-stop: an empty stop string would end every response at once; drop it"]
                  if self.rollout_stop and not all(self.rollout_stop) else []),
                *at_least_one({"--max-turns": self.max_turns}),
                *must("--tool-timeout-s", self.tool_timeout_s, self.tool_timeout_s > 0, "> 0"),
                *must("--rollout-seed", self.rollout_seed, self.rollout_seed is None or self.rollout_seed >= 0,
                      ">= 0 (numpy's SeedSequence takes no negative seed)")]


@dataclass(frozen=True)
class AlgorithmConfig(Section):
    advantage_estimator: str = opt("grpo", "advantage estimator",
                                   choices=["grpo", "gspo", "rloo", "reinforce_plus_plus",
                                            "reinforce_plus_plus_baseline"])
    disable_grpo_std_normalization: bool = opt(False, "GRPO without dividing by the group std (Dr.GRPO)")
    eps_clip: float = opt(0.2, "PPO clip range (lower, and upper unless --eps-clip-high)")
    eps_clip_high: float | None = opt(None, "PPO upper clip range (DAPO clip-higher)")
    eps_clip_c: float | None = opt(None, "dual-clip bound (> 1) for negative advantages")
    use_tis: bool = opt(False, "truncated importance sampling between rollout and trainer logprobs")
    tis_clip: float = opt(2.0, "upper bound of the truncated importance weight")
    tis_clip_low: float = opt(0.0, "lower bound of the truncated importance weight")
    use_kl_loss: bool = opt(False, "add a KL(actor || reference) term to the loss")
    kl_loss_coef: float = opt(0.0, "weight of the KL loss (0 with --use-kl-loss: the KL is computed and logged but "
                                   "not added to the loss, as in slime)")
    kl_loss_type: str = opt("low_var_kl", "KL estimator (for the loss and the reward penalty)",
                            choices=["k1", "k2", "k3", "low_var_kl"])
    kl_coef: float = opt(0.0, "KL(actor || reference) as a reward penalty: per token for reinforce_plus_plus, "
                              "summed over the response for the other estimators")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (subtracted from the loss)")
    calculate_per_token_loss: bool = opt(True, "average the loss over tokens (else over sequences)")
    loss_type: str = opt("policy_loss", "what a step optimises: policy_loss (RL: rollout, reward, advantages) or sft "
                                        "(supervised fine-tuning on the records' responses, --response-key, with "
                                        "the prompt tokens masked; no rollout; sft_loss is accepted as a name)",
                         choices=["policy_loss", "sft", "sft_loss"])

    def check(self) -> list[str]:
        problems = [*must("--eps-clip", self.eps_clip, self.eps_clip > 0, "> 0"),
                    *must("--eps-clip-high", self.eps_clip_high, self.eps_clip_high is None or self.eps_clip_high > 0,
                          "> 0"),
                    *must("--kl-loss-coef", self.kl_loss_coef, self.kl_loss_coef >= 0, ">= 0"),
                    *must("--kl-coef", self.kl_coef, self.kl_coef >= 0, ">= 0"),
                    *must("--entropy-coef", self.entropy_coef, self.entropy_coef >= 0, ">= 0")]
        if self.eps_clip_c is not None and self.eps_clip_c <= 1:
            problems.append(f"--eps-clip-c {self.eps_clip_c}: the dual-clip bound must be > 1 (3.0 is usual)")
        if self.use_tis and not 0 <= self.tis_clip_low < self.tis_clip:
            problems.append(f"--tis-clip-low {self.tis_clip_low} / --tis-clip {self.tis_clip}: need 0 <= low < high")
        return problems


@dataclass(frozen=True)
class OptimizerConfig(Section):
    optimizer: str = opt("adam", "adam (AdamW: decoupled weight decay) or sgd (with --sgd-momentum)",
                         choices=["adam", "sgd"])
    sgd_momentum: float = opt(0.9, "with --optimizer sgd: the momentum (Megatron's default, 0.9)")
    lr: float = opt(1e-6, "learning rate")
    weight_decay: float = opt(0.0, "weight decay (decoupled with adam)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this value")
    lr_decay_style: str = opt("constant", "learning-rate schedule after warmup (Megatron's scheduler)",
                              choices=["constant", "linear", "cosine"])
    lr_warmup_iters: int = opt(0, "optimizer steps of linear warmup from 0 to --lr")
    lr_decay_iters: int | None = opt(None, "optimizer steps over which the rate decays from --lr to --min-lr "
                                           "(default: every optimizer step of the run)")
    min_lr: float = opt(0.0, "learning rate at the end of the decay")
    use_distributed_optimizer: bool = opt(False, "shard the optimizer state (fp32 main params, Adam moments) over "
                                                 "the data-parallel ranks")

    def check(self) -> list[str]:
        decay = self.lr_decay_iters
        problems = [*must("--lr", self.lr, self.lr > 0, "> 0 (1e-6 is usual for RL on a pretrained model)"),
                    *must("--weight-decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                    *must("--adam-beta1", self.adam_beta1, 0 <= self.adam_beta1 < 1, "in [0, 1)"),
                    *must("--adam-beta2", self.adam_beta2, 0 <= self.adam_beta2 < 1, "in [0, 1)"),
                    *must("--clip-grad", self.clip_grad, self.clip_grad > 0, "> 0"),
                    *must("--sgd-momentum", self.sgd_momentum, 0 <= self.sgd_momentum < 1, "in [0, 1)")]
        if self.lr_warmup_iters < 0 or (decay is not None and decay < 1):
            problems.append(f"--lr-warmup-iters {self.lr_warmup_iters} / --lr-decay-iters {decay}: warmup must be "
                            f">= 0 and decay >= 1 optimizer steps")
        if problems:
            return problems
        if not 0 <= self.min_lr <= self.lr:
            problems.append(f"--min-lr {self.min_lr}: must be in [0, --lr {self.lr}]")
        if self.optimizer == "sgd" and self.use_distributed_optimizer:
            problems.append("--optimizer sgd with --use-distributed-optimizer: Megatron shards Adam's state only; "
                            "drop one of them")
        return problems


@dataclass(frozen=True)
class DataConfig(Section):
    prompt_data: str = opt(None, "jsonl or .parquet file of prompt records", required=True)
    input_key: str = opt("prompt", "record key of the prompt: a string or a list of chat messages")
    label_key: str = opt("label", "record key of the reference answer given to the reward")
    response_key: str = opt("response", "with --loss-type sft: record key of the response to learn (a string)")
    metadata_key: str = opt("metadata", "record key of an object passed to custom rewards as metadata (optional)")
    apply_chat_template: bool = opt(False, "render string prompts with the tokenizer's chat template too "
                                           "(a list of chat messages is always rendered with it)")
    skip_bad_records: bool = opt(False, "skip and count malformed records instead of stopping at the first")
    rm_type: str | None = opt(None, "rule-based reward: math (default), dapo, deepscaler, or letter (the demo "
                                    "task); custom when --custom-rm-path is given, remote with --rm-url",
                                choices=list(RM_TYPES))
    custom_rm_path: str | None = opt(None, "a reward function fn(response, label, metadata) -> float (sync or "
                                           "async), as package.module.function or path/to/file.py:function")
    reward_timeout_s: float = opt(10.0, "a reward slower than this scores 0 and counts as a failure")
    rm_url: str | None = opt(None, "a reward server: each sample is POSTed as JSON {prompt, response, label, "
                                   "metadata}, the reply is a number or {\"reward\": number}; retried with backoff "
                                   "within --reward-timeout-s")

    def check(self) -> list[str]:
        problems = must("--reward-timeout-s", self.reward_timeout_s, self.reward_timeout_s > 0, "> 0")
        if self.custom_rm_path and self.rm_type != "custom":
            problems.append(f"--rm-type {self.rm_type} and --custom-rm-path both name a reward; keep one")
        if self.rm_type == "custom" and not self.custom_rm_path:
            problems.append("--rm-type custom needs --custom-rm-path package.module.function")
        if self.rm_url and self.rm_type != "remote":
            problems.append(f"--rm-type {self.rm_type} and --rm-url both name a reward; keep one")
        if self.rm_type == "remote" and not self.rm_url:
            problems.append("--rm-type remote needs --rm-url http://host:port/path")
        if self.rm_url and not self.rm_url.startswith(("http://", "https://")):
            problems.append(f"--rm-url {self.rm_url}: must start with http:// or https://")
        return problems


@dataclass(frozen=True)
class TrainConfig(Section):
    num_rollout: int = opt(10, "RL steps to run")
    global_batch_size: int | None = opt(None, "samples per optimizer step (default: the whole rollout)")
    micro_batch_size: int = opt(4, "samples per forward/backward pass on one rank (without "
                                   "--use-dynamic-batch-size)")
    use_dynamic_batch_size: bool = opt(False, "group each rank's samples into micro-batches by a token budget "
                                              "(--max-tokens-per-gpu) instead of --micro-batch-size samples")
    max_tokens_per_gpu: int | None = opt(None, "with --use-dynamic-batch-size: tokens per training micro-batch, "
                                               "padding included (padded length x samples); a longer sample is "
                                               "trained alone")
    log_probs_max_tokens_per_gpu: int | None = opt(None, "with --use-dynamic-batch-size: tokens per micro-batch of "
                                                         "the logprob passes (default: --max-tokens-per-gpu)")
    seed: int = opt(1234, "seed of sampling, data order and initialisation")
    attention_backend: str = opt("sdpa", "core attention: sdpa (causal scaled_dot_product_attention, no [s, s] mask "
                                         "or scores kept) or local (Megatron's unfused attention); Megatron-LM's "
                                         "names from slime scripts map onto these: flash, fused, auto -> sdpa; "
                                         "unfused -> local",
                                 choices=["sdpa", "local", *ATTENTION_BACKEND_ALIASES])
    recompute_granularity: str | None = opt(None, "activation recompute: full (whole layers) or selective (the core "
                                                  "attention)", choices=["full", "selective"])
    recompute_method: str | None = opt(None, "with full recompute: uniform (every layer, in chunks of "
                                             "--recompute-num-layers) or block (the first --recompute-num-layers "
                                             "layers of each stage)", choices=["uniform", "block"])
    recompute_num_layers: int | None = opt(None, "with full recompute: layers per chunk (uniform) or per stage "
                                                 "(block)")
    train_memory_margin_bytes: int = opt(1 << 30, "device memory kept free when the trainer resumes or allocates "
                                                  "in its regions (accelerators); less stops the run with an error")

    def check(self) -> list[str]:
        problems = [*at_least_one({"--num-rollout": self.num_rollout, "--global-batch-size": self.global_batch_size,
                                   "--micro-batch-size": self.micro_batch_size,
                                   "--recompute-num-layers": self.recompute_num_layers}),
                    *must("--seed", self.seed, self.seed >= 0, ">= 0 (numpy's SeedSequence takes no negative seed)"),
                    *must("--train-memory-margin-bytes", self.train_memory_margin_bytes,
                          self.train_memory_margin_bytes >= 0, ">= 0")]
        for flag, value in {"--max-tokens-per-gpu": self.max_tokens_per_gpu,
                            "--log-probs-max-tokens-per-gpu": self.log_probs_max_tokens_per_gpu}.items():
            if value is not None and value < 1:
                problems.append(f"{flag} {value}: must be at least 1")
            elif value is not None and not self.use_dynamic_batch_size:
                problems.append(f"{flag} applies with --use-dynamic-batch-size only (micro-batches are otherwise "
                                f"--micro-batch-size samples); add --use-dynamic-batch-size or drop {flag}")
        if self.use_dynamic_batch_size and self.max_tokens_per_gpu is None:
            problems.append("--use-dynamic-batch-size needs --max-tokens-per-gpu N (tokens per micro-batch, padding "
                            "included); add it")
        return problems or self._check_recompute()

    def _check_recompute(self) -> list[str]:
        method, num_layers = self.recompute_method, self.recompute_num_layers
        if self.recompute_granularity == "full" and (method is None or num_layers is None):
            return ["--recompute-granularity full needs --recompute-method uniform|block and "
                    "--recompute-num-layers N"]
        if self.recompute_granularity != "full" and (method is not None or num_layers is not None):
            return [f"--recompute-method / --recompute-num-layers apply to --recompute-granularity full only "
                    f"(given: {self.recompute_granularity}); use full granularity or drop them"]
        return []


@dataclass(frozen=True)
class CheckpointConfig(Section):
    save: str | None = opt(None, "folder for checkpoints (policy shards, optimizer, data position), written atomically")
    save_interval: int | None = opt(None, "save every this many steps (and after the last); default: only after "
                                          "the last")
    load: str | None = opt(None, "resume from the latest checkpoint in this folder, in any training layout; with no "
                                 "checkpoint inside, start from --hf-checkpoint (so --load X --save X also serves the "
                                 "first launch)")
    save_optim: bool = opt(True, "save the optimizer state with each checkpoint (--no-save-optim: weights only; a "
                                 "resumed run then starts its optimizer afresh)")
    keep_last_n_checkpoints: int | None = opt(None, "after each save, delete all but the newest N checkpoints in "
                                                    "--save")
    save_hf: str | None = opt(None, "also write the policy as an HF model folder: DIR/iter_XXXXXXX, or DIR with "
                                    "{rollout_id} filled in")
    save_hf_interval: int | None = opt(None, "write --save-hf every this many steps (and after the last); default: "
                                             "only after the last")

    def check(self) -> list[str]:
        rules = (("--save-interval", self.save_interval, "--save", self.save),
                 ("--keep-last-n-checkpoints", self.keep_last_n_checkpoints, "--save", self.save),
                 ("--save-hf-interval", self.save_hf_interval, "--save-hf", self.save_hf))
        return [f"{flag} {value}: needs {needed} DIR and a value >= 1" for flag, value, needed, folder in rules
                if value is not None and (value < 1 or folder is None)]


@dataclass(frozen=True)
class EvalConfig(Section):
    eval_prompt_data: list[str] | None = opt(None, "held-out prompt sets to evaluate during training: NAME PATH "
                                                   "[NAME PATH ...] (jsonl or .parquet, the --prompt-data schema)",
                                             metavar="NAME PATH")
    eval_interval: int | None = opt(None, "evaluate every this many steps (always before step 1 and after the last)")
    n_samples_per_eval_prompt: int = opt(1, "responses generated per eval prompt (pass@k for k = 1, 2, 4, ... up "
                                            "to it)")
    eval_max_response_len: int | None = opt(None, "most tokens per eval response (default: --rollout-max-response-len)")
    eval_temperature: float | None = opt(None, "eval sampling temperature, 0 for greedy (default: "
                                               "--rollout-temperature)")
    eval_top_p: float | None = opt(None, "eval nucleus sampling threshold (default: --rollout-top-p)")

    def check(self) -> list[str]:
        data = self.eval_prompt_data
        if data is None:
            given = (("--eval-interval", self.eval_interval), ("--eval-max-response-len", self.eval_max_response_len),
                     ("--eval-temperature", self.eval_temperature), ("--eval-top-p", self.eval_top_p))
            return [f"{flag} applies to evaluation only; add --eval-prompt-data NAME PATH"
                    for flag, value in given if value is not None]
        if len(data) % 2:
            return [f"--eval-prompt-data {' '.join(data)}: give pairs of NAME PATH (got {len(data)} values), "
                    "e.g. --eval-prompt-data aime aime.jsonl math500 math500.jsonl"]
        names = [name for name, _ in eval_sets(self)]
        problems = [f"--eval-prompt-data: the name {name!r} becomes the metric key eval/{name}/...; use letters, "
                    "digits, '_', '-' or '.'" for name in names if not set(name) <= EVAL_NAME_CHARS]
        if len(set(names)) < len(names):
            problems.append(f"--eval-prompt-data: the names {names} repeat; give each set its own name")
        lows = {"--eval-interval": (self.eval_interval, 1),
                "--n-samples-per-eval-prompt": (self.n_samples_per_eval_prompt, 1),
                "--eval-max-response-len": (self.eval_max_response_len, 1),
                "--eval-temperature": (self.eval_temperature, 0)}
        problems += [f"{flag} {value}: must be at least {low}" for flag, (value, low) in lows.items()
                     if value is not None and value < low]
        top_p = self.eval_top_p
        return problems + must("--eval-top-p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1]")


@dataclass(frozen=True)
class LogConfig(Section):
    log_dir: str | None = opt(None, "folder for metrics.jsonl (default: runs/<time>)")
    use_tensorboard: bool = opt(False, "write TensorBoard events under <log-dir>/tensorboard (rank 0; needs the "
                                       "observe extra)")
    use_wandb: bool = opt(False, "log to Weights & Biases (rank 0; needs the observe extra; WANDB_MODE=offline "
                                 "writes under <log-dir>/wandb without network)")
    wandb_project: str | None = opt(None, "wandb project (default: vime-spmd)")
    wandb_group: str | None = opt(None, "wandb group of the run")
    wandb_run_name: str | None = opt(None, "wandb run name (default: the log folder's name)")
    log_samples_interval: int | None = opt(None, "every this many steps, write a few prompts with their responses, "
                                                 "rewards and labels to <log-dir>/samples.jsonl (and TensorBoard)")
    verbose: bool = opt(False, "show the libraries' (Megatron, vLLM, transformers) log lines and warnings")

    def check(self) -> list[str]:
        problems = [] if self.use_wandb else [
            f"{flag} {value}: wandb is off; add --use-wandb"
            for flag, value in (("--wandb-project", self.wandb_project), ("--wandb-group", self.wandb_group),
                                ("--wandb-run-name", self.wandb_run_name)) if value is not None]
        return problems + at_least_one({"--log-samples-interval": self.log_samples_interval})


@dataclass(frozen=True)
class ResilienceConfig(Section):
    hang_timeout_s: float = opt(120.0, "end the job when a rank has sent no heartbeat for this long (a stopped or "
                                       "dead rank); the heartbeat is a thread, so long phases do not count")
    phase_timeout_s: float | None = opt(None, "end the job when one phase of a step (e.g. the rollout) runs longer "
                                              "than this (default: no limit)")

    def check(self) -> list[str]:
        phase = self.phase_timeout_s
        return [*must("--hang-timeout-s", self.hang_timeout_s, self.hang_timeout_s > 0, "> 0"),
                *must("--phase-timeout-s", phase, phase is None or phase > 0, "> 0")]


def eval_sets(e: EvalConfig) -> list[tuple[str, str]]:
    """(name, path) pairs of --eval-prompt-data."""
    pairs = e.eval_prompt_data or []
    return list(zip(pairs[0::2], pairs[1::2]))
