"""Input checks that need files or imports, run by `loop.prepare.prepare` after `check_config` (the config's own
rules) and before any model or engine work.

Each raises ValueError naming the flag (or file), the problem and the fix; run.py prints it as one `error:` line.
Nothing here writes anything that stays: output folders are tested with a probe file that is removed again, and
a folder that does not exist yet is tested in its nearest existing parent (it is created when first written).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from ..train.megatron import MODEL_TYPES
from . import OBSERVE_EXTRA, Config, LogConfig

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Any one of these lets transformers build the tokenizer of a local folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_dashboards(g: LogConfig) -> None:
    """The packages --use-tensorboard and --use-wandb need are installed."""
    import importlib.util

    for flag, wanted, package in (("--use-tensorboard", g.use_tensorboard, "tensorboard"),
                                  ("--use-wandb", g.use_wandb, "wandb")):
        if wanted and importlib.util.find_spec(package) is None:
            raise ValueError(f"{flag} needs the {package} package, which is not installed; install the observe "
                             f"extra: {OBSERVE_EXTRA}")


def check_model_dir(path: str, flag: str, *, tokenizer: bool) -> None:
    """An HF model folder: config.json that parses, weights whose every safetensors header reads, and (for the
    policy) tokenizer files."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{flag} {folder}: no such directory; give an HF model folder "
                         f"(make one with: python -m vime_spmd.tools.make_tiny_model {folder})")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{flag} {folder}: no config.json inside; is it an HF model folder?")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError) as e:
        raise ValueError(f"{flag} {config}: not readable JSON ({e}); restore the model's config.json") from None
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{flag} {folder}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(MODEL_TYPES)}")
    weights = sorted(f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern))
    if not weights:
        raise ValueError(f"{flag} {folder}: no weights inside (no *.safetensors or pytorch_model*.bin); "
                         "download the model's weight files into it")
    _check_index(folder, flag)
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors(file, flag)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{flag} {folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                         "model's tokenizer files into the folder")


def _check_index(folder: Path, flag: str) -> None:
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise ValueError(f"{flag} {index}: not a readable weight index ({type(e).__name__}: {e})") from None
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise ValueError(f"{flag} {folder}: {SAFETENSORS_INDEX} names {len(missing)} missing weight file(s), "
                         f"e.g. {missing[0]}; the download is incomplete")


def check_safetensors(file: Path, flag: str) -> None:
    """Read the file's header with safetensors itself: it refuses bad JSON and a data region that the header's
    offsets do not exactly cover (a truncated or overwritten file). Only the header is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{flag} {file}: not a valid safetensors file ({e}); the file is corrupt or "
                         "incomplete, download it again") from None


def load_tokenizer(path: str):
    """The policy's tokenizer; transformers' many failure types become one message naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, TypeError, KeyError, ... depending on what is broken
        raise ValueError(f"--hf-checkpoint {path}: the tokenizer does not load ({type(e).__name__}: {e}); "
                         "check the folder's tokenizer files") from None


def check_output_dir(path: str, flag: str) -> None:
    """That this process can create `path` (if missing) and write files in it, without leaving anything behind."""
    folder = Path(path).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    probe = existing / f".vime-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"probe")
    except OSError as e:
        where = "" if existing == folder else f" (it does not exist yet, and its parent {existing} is not writable)"
        raise ValueError(f"{flag} {path}: cannot write there{where}: {e.strerror}; choose a writable folder") from None
    finally:
        probe.unlink(missing_ok=True)


def check_reward(cfg: Config) -> None:
    """The reward (and the dynamic-sampling filter) load now, so that a typo stops the run before the engines."""
    from ..rewards import load_custom_reward
    from ..rollout.filters import load_filter

    d = cfg.data
    if d.custom_rm_path:
        check_arity(load_custom_reward(d.custom_rm_path), ("response", "label", "metadata"), "--custom-rm-path",
                    d.custom_rm_path)
    path = cfg.rollout.dynamic_sampling_filter_path
    if path:
        check_arity(load_filter(path), ("rewards",), "--dynamic-sampling-filter-path", path)


def check_generate(cfg: Config) -> None:
    """The generation function (--custom-generate-function-path, or --max-turns' tool loop and its --tools) loads
    and takes (record, sampling, tokenizer, client)."""
    from ..rollout.turns import GENERATE_ARGS, load_generate_function

    fn = load_generate_function(cfg.rollout)
    path = cfg.rollout.custom_generate_function_path
    if fn is not None and path is not None:
        check_arity(fn, GENERATE_ARGS, "--custom-generate-function-path", path)


def check_arity(fn, names: tuple[str, ...], flag: str, path: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; calling them will tell
        return
    try:
        signature.bind(*names)
    except TypeError:
        raise ValueError(f"{flag}={path!r}: the function takes {signature}, but it is called as "
                         f"fn({', '.join(names)}); change its parameters") from None


def check_responses(dataset) -> None:
    """With --loss-type sft, every record's response (--response-key) must hold text: an empty one would train the
    model to end every answer at once."""
    for prompt in dataset.prompts:
        if not prompt.label.strip():
            raise ValueError(f"{prompt.source}: the response (--response-key) is empty; give each record the response "
                             "to learn, or drop the record")
