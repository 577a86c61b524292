"""Text from a trained run, in the style of nanoGPT's sample.py: ``attnlab-sample`` (and
``python scripts/sample.py`` in a checkout) runs :func:`run`; :func:`sample` is the same work
for Python callers, returning the tokens and timings.

The checkpoint rebuilds everything: the model from its hyper-parameters and weights, the
tokenizer from the record LitLM writes into every checkpoint (GPT-2 BPE through
:func:`attnlab.data.tokenizers.load_gpt2`, or the run's character alphabet). Checkpoints written
before that record existed fall back to the run directory's ``config.json`` (the checkpoint's
grandparent folder), whose data config rebuilds the tokenizer the run trained with.

The prompt is one eager call; then one token at a time with the KV cache, through the compiled
static step with ``compile=true`` (:meth:`attnlab.model.GPT.stream`), each token's text printed as
soon as it is complete (a character split across BPE tokens appears with its last byte). The
speed goes to stderr: the prompt's call, the first step (with ``compile=true`` it compiles the
step) and the tokens/s of the steps after it.

Bad input stops the command with one line on stderr and exit status 2 (:func:`run`): a missing
checkpoint, an empty prompt, a prompt (plus the new tokens) longer than a model with learned
absolute positions can take, an unknown tokenizer.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from attnlab.config import ConfigError, ModelConfig, from_dict, require, to_container
from attnlab.data.tokenizers import StreamDecoder, Tokenizer, TokenizerError, tokenizer_from_spec
from attnlab.errors import InputError, one_line_errors
from attnlab.model import GPT


class SampleError(InputError):
    """Input the sampler cannot work with; its message is the one line the command prints."""


@dataclass
class SampleSettings:
    """The sample config's top-level options (conf/sample.yaml)."""

    ckpt_path: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    compile: bool
    seed: int
    device: str | None
    threads: int | None
    tokenizer_dir: str | None


def load_settings(cfg: Any) -> SampleSettings:
    """The validated options; :class:`ConfigError` names the first bad one."""
    values = {name: to_container(cfg.get(name)) for name in SampleSettings.__dataclass_fields__}
    ckpt_path = values["ckpt_path"]
    require(isinstance(ckpt_path, str) and ckpt_path != "", "ckpt_path", ckpt_path,
            "a checkpoint file, e.g. outputs/train/runs/<run>/checkpoints/last.ckpt")
    require(Path(ckpt_path).is_file(), "ckpt_path", ckpt_path, "an existing checkpoint file", reason="file not found")
    prompt = values["prompt"]
    require(isinstance(prompt, str), "prompt", prompt, "a non-empty string (quote numbers: 'prompt=\"1984\"')")
    require(prompt != "", "prompt", prompt, "a non-empty string", reason="empty prompt")
    settings = SampleSettings(**values)
    require(isinstance(settings.max_new_tokens, int) and settings.max_new_tokens >= 1, "max_new_tokens",
            settings.max_new_tokens, "an integer >= 1")
    require(isinstance(settings.temperature, (int, float)) and settings.temperature >= 0, "temperature",
            settings.temperature, "a number >= 0 (0: greedy)")
    require(settings.top_k is None or (isinstance(settings.top_k, int) and settings.top_k >= 1), "top_k",
            settings.top_k, "null (every token) or an integer >= 1")
    require(isinstance(settings.compile, bool), "compile", settings.compile, "true | false")
    require(isinstance(settings.seed, int), "seed", settings.seed, "an integer")
    require(settings.device is None or settings.device in ("cpu", "cuda") or str(settings.device).startswith("cuda:"),
            "device", settings.device, "null (cuda when available) | cpu | cuda | cuda:<index>")
    require(settings.threads is None or (isinstance(settings.threads, int) and settings.threads >= 1), "threads",
            settings.threads, "null (every core) or an integer >= 1")
    return settings


def load_model(checkpoint: dict[str, Any], path: str) -> GPT:
    """The GPT of a LitLM checkpoint: config from its hyper-parameters, then its weights."""
    from attnlab.attention import resolve_layer_attention

    hyper = checkpoint.get("hyper_parameters") or {}
    if "model" not in hyper or "attention" not in hyper or "state_dict" not in checkpoint:
        raise SampleError(f"ckpt_path={path!r}: not an attnlab training checkpoint (no model config or weights)")
    model_cfg = from_dict(ModelConfig, hyper["model"], "model")
    model = GPT(model_cfg, resolve_layer_attention(hyper["attention"], model_cfg))
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.eval()


def tokenizer_spec(checkpoint: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's tokenizer record and its config (None when the checkpoint carries the record)."""
    spec = (checkpoint.get("attnlab") or {}).get("tokenizer")
    if spec is not None:
        return spec, None
    # a checkpoint from before the record: the run directory's data config rebuilds the tokenizer
    from attnlab.io import read_json

    config_path = Path(path).resolve().parent.parent / "config.json"
    run_cfg = read_json(config_path)
    data = (run_cfg or {}).get("data")
    if not data:
        raise SampleError(f"ckpt_path={path!r}: the checkpoint records no tokenizer and there is no run config "
                          f"with a data section at {config_path} to rebuild it from")
    from hydra.utils import instantiate

    datamodule = instantiate(data, _convert_="all")
    if not hasattr(datamodule, "tokenizer_spec"):
        raise SampleError(f"unknown tokenizer: the run's data ({data.get('_target_')}) has no text tokenizer")
    return datamodule.tokenizer_spec(), run_cfg


def load_tokenizer(spec: dict[str, Any], settings: SampleSettings, cfg: Any,
                   run_cfg: dict[str, Any] | None) -> Tokenizer:
    """Rebuild the tokenizer; the GPT-2 ranks are looked for in ``tokenizer_dir``, the data root
    (``paths.data_dir``) and the run's own data folders."""
    from omegaconf import OmegaConf

    data_dir, cache_dir = (OmegaConf.select(cfg, f"paths.{key}") for key in ("data_dir", "cache_dir"))
    run_data = (run_cfg or {}).get("data") or {}
    search = [settings.tokenizer_dir, data_dir, run_data.get("tokenizer_dir"), run_data.get("data_dir")]
    cache_dir = Path(cache_dir) / "tiktoken" if cache_dir else None
    try:
        return tokenizer_from_spec(spec, search, cache_dir)
    except TokenizerError as error:
        raise SampleError(f"tokenizer: {error}") from None


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "cpu | null", reason="CUDA is not available on this machine")
    return torch.device(name)


def sample(cfg: Any, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> dict[str, Any]:
    """Sample as configured, streaming the text to ``out`` and the speed to ``err``; returns the
    prompt and new token ids, the text and the timings."""
    from attnlab.checkpoint import load_checkpoint

    settings = load_settings(cfg)
    device = pick_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    checkpoint = load_checkpoint(settings.ckpt_path)
    model = load_model(checkpoint, settings.ckpt_path).to(device)
    spec, run_cfg = tokenizer_spec(checkpoint, settings.ckpt_path)
    del checkpoint
    tokenizer = load_tokenizer(spec, settings, cfg, run_cfg)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise SampleError(f"tokenizer: {tokenizer.vocab_size} ids, more than the model's vocabulary of "
                          f"{model.cfg.vocab_size}")

    prompt_ids = [int(i) for i in tokenizer.encode(settings.prompt)]
    require(len(prompt_ids) > 0, "prompt", settings.prompt, "text with at least one token", reason="no tokens")
    limit = model.cfg.max_seq_len
    if model.pos_emb is not None and len(prompt_ids) > limit:
        raise SampleError(f"prompt: {len(prompt_ids)} tokens, longer than the model's context of {limit} tokens "
                          "(learned absolute positions)")
    if model.pos_emb is not None and len(prompt_ids) + settings.max_new_tokens > limit:
        raise SampleError(f"max_new_tokens={settings.max_new_tokens}: the prompt's {len(prompt_ids)} tokens and "
                          f"{settings.max_new_tokens} new ones exceed the model's context of {limit} tokens "
                          "(learned absolute positions)")

    generator = torch.Generator(device).manual_seed(settings.seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    decoder = StreamDecoder(tokenizer)
    out.write(settings.prompt)
    out.flush()
    new_ids: list[int] = []
    arrived: list[float] = []  # when each new token was sampled
    started = time.perf_counter()
    for token in model.stream(idx, settings.max_new_tokens, settings.temperature, settings.top_k, generator,
                              compile=settings.compile):
        new_ids.append(int(token))
        arrived.append(time.perf_counter())
        out.write(decoder.push(new_ids[-1]))
        out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    # token 1 comes from the prompt's call, token 2 from the first step (which compiles the step
    # with compile=true); the speed is that of the steps after it
    steps = len(arrived) - 2
    tokens_per_s = steps / (arrived[-1] - arrived[1]) if steps > 0 and arrived[-1] > arrived[1] else None
    report = f"{len(new_ids)} tokens: prompt of {len(prompt_ids)} tokens {arrived[0] - started:.2f} s"
    if len(arrived) > 1:
        report += f", first step {arrived[1] - arrived[0]:.2f} s{' (compiling it)' if settings.compile else ''}"
    if tokens_per_s is not None:
        report += f", then {tokens_per_s:,.1f} tokens/s"
    err.write(report + "\n")
    return {"prompt_ids": prompt_ids, "new_ids": new_ids, "text": tokenizer.decode(new_ids),
            "prompt_s": arrived[0] - started, "tokens_per_s": tokens_per_s}


def run(cfg: Any) -> None:
    """The command (the Hydra target of ``attnlab-sample``): :func:`sample` to stdout and stderr;
    bad input ends it with one ``error: ...`` line on stderr and exit status 2, no traceback."""
    with one_line_errors():
        sample(cfg, sys.stdout, sys.stderr)  # the streams of now (a test's capture), not of import time
