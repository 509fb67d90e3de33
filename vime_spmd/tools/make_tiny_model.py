"""Build a tiny random Qwen3, Qwen2 or Llama 3 model and a locally trained byte-level BPE tokenizer, as an HF dir.

    python -m vime_spmd.tools.make_tiny_model /tmp/tiny-qwen3 --num-layers 2 --seed 0
    python -m vime_spmd.tools.make_tiny_model /tmp/tiny-qwen2 --family qwen2

The directory loads in transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and in vLLM. It is the model of
the demo and of the tests, and a smoke-test tool for users: no hub access is needed. The same arguments and
seed give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen-style ChatML; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or have not are but one two "
    "three four five six seven eight nine ten add sum number answer question letter say write repeat many "
    "times what how much plus minus equals total result please think step first then so therefore"
).split()


def _corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """Synthetic text mixing words, letters and arithmetic, so merges cover what prompts contain."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
        lines.append(f"{' '.join(words)} {a} + {b} = {a + b}. {letter * rng.randint(1, 6)}")
    return lines


def build_tokenizer(vocab_size: int, seed: int, split_digits: bool = False):
    """A byte-level BPE tokenizer trained on the synthetic corpus, wrapped for transformers; with `split_digits`,
    every digit is a token of its own (as in Qwen's tokenizers), so that numbers never merge into one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Llama 3.1-style RoPE: theta 500k with "llama3" frequency scaling (the values every Llama 3.x release uses).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def build_model(args: argparse.Namespace, vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        rms_norm_eps=1e-6,
        torch_dtype=args.dtype,
    )
    if args.family == "qwen3":
        config, cls = Qwen3Config(**common, head_dim=args.head_dim, rope_theta=10000.0), Qwen3ForCausalLM
    elif args.family == "qwen2":  # head_dim is hidden_size / heads (checked in make_tiny_model)
        config, cls = Qwen2Config(**common, rope_theta=10000.0), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common, head_dim=args.head_dim, rope_parameters=dict(LLAMA3_ROPE)), LlamaForCausalLM
    torch.manual_seed(args.seed)
    model = cls(config)  # initialised in fp32, then cast: the same seed gives the same weights in either dtype
    if args.family == "qwen2":
        # transformers zero-initialises biases; random ones make the conversion tests see a misplaced bias.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(std=0.02)
    return model.to(getattr(torch, args.dtype))


def make_tiny_model(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if args.head_dim < 32:
        raise ValueError(f"--head-dim {args.head_dim}: vLLM's CPU attention needs head_dim >= 32; use 32 or more")
    if args.family == "qwen2" and args.hidden_size != args.num_heads * args.head_dim:
        raise ValueError(f"--family qwen2 derives head_dim from --hidden-size / --num-heads: set --hidden-size "
                         f"{args.num_heads * args.head_dim} (or --head-dim {args.hidden_size // args.num_heads})")
    if args.num_heads % args.num_kv_heads:
        raise ValueError(f"--num-heads {args.num_heads} must be a multiple of --num-kv-heads {args.num_kv_heads}")
    tokenizer = build_tokenizer(args.vocab_size, args.seed, args.split_digits)
    if len(tokenizer) > args.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than --vocab-size {args.vocab_size}")
    model = build_model(args, args.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.config.bos_token_id = None
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "vime_tiny_model.json").write_text(json.dumps(vars(args), indent=1, default=str))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="output directory (created)")
    p.add_argument("--family", choices=["qwen3", "qwen2", "llama"], default="qwen3",
                   help="architecture: Qwen3 (q/k norms), Qwen2 (q/k/v biases), Llama 3 (llama3 RoPE scaling)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=512, help="model vocabulary; the tokenizer fills up to it")
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--tie-word-embeddings", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-digits", action="store_true",
                   help="one token per digit (for arithmetic tasks), as Qwen's tokenizers do")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the saved weights (bfloat16 for real-size shapes on accelerators)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = make_tiny_model(args)
    print(f"tiny {args.family} model written to {out}")


if __name__ == "__main__":
    main()
