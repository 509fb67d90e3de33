"""Everything that can reject the user's input, run before any expensive work: the config's checks, the files and
functions it names (config.checks), and the prompt data, read and tokenized."""

from __future__ import annotations

import os

from ..config import Config, check_config, checks
from ..data.prompts import PromptDataset
from ..parallel import pipeline_split
from . import checkpoint
from .evaluation import EvalSet, load_eval_sets


def prepare(cfg: Config) -> tuple[PromptDataset, list[EvalSet]]:
    """Everything that can reject the user's input, before any expensive work (checks.py): the training prompts and
    the eval sets. Raises ValueError. Every rank runs the same checks; failures.report prints the first rank's error
    once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_config(cfg, world_size)
    checks.check_dashboards(cfg.log)
    checks.check_model_dir(cfg.model.hf_checkpoint, "--hf-checkpoint", tokenizer=True)
    if cfg.model.ref_load:
        if checkpoint.model_checkpoint(cfg.model.ref_load, "--ref-load") is None:  # else a torch_dist checkpoint
            checks.check_model_dir(cfg.model.ref_load, "--ref-load", tokenizer=False)
    p = cfg.parallel
    if cfg.checkpoint.load:
        checkpoint.check_loadable(cfg.checkpoint.load)
    checks.check_reward(cfg)
    checks.check_generate(cfg)
    if cfg.checkpoint.save:
        checks.check_output_dir(cfg.checkpoint.save, "--save")
    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the logs
        checks.check_output_dir(cfg.log.log_dir, "--log-dir")
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(cfg.model.hf_checkpoint).num_hidden_layers
    pipeline_split(num_layers, p.pipeline_model_parallel_size, p.decoder_first_pipeline_num_layers,
                   p.decoder_last_pipeline_num_layers)
    tokenizer = checks.load_tokenizer(cfg.model.hf_checkpoint)
    d = cfg.data
    # Supervised fine-tuning reads each record's response where RL reads its reference answer.
    label_key, label_flag = (d.response_key, "--response-key") if cfg.sft else (d.label_key, "--label-key")
    dataset = PromptDataset(d.prompt_data, tokenizer, input_key=d.input_key, label_key=label_key,
                            metadata_key=d.metadata_key, apply_chat_template=d.apply_chat_template,
                            max_prompt_len=cfg.rollout.rollout_max_prompt_len, seed=cfg.train.seed,
                            skip_bad_records=d.skip_bad_records, label_flag=label_flag)
    if cfg.sft:
        checks.check_responses(dataset)
    return dataset, load_eval_sets(cfg, tokenizer)
