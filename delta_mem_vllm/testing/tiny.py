"""Tiny random-weight checkpoints and an in-code tokenizer for offline tests and demos.

Nothing here touches the network: the tokenizer is assembled with the ``tokenizers``
library and the models are instantiated from configs with seeded random weights.
The shapes are deliberately small (hidden 128, 2 layers, GQA 4:2, head_dim 32) so a
forward pass costs milliseconds on CPU while still exercising every code path the
real architectures have (GQA, Qwen3 q/k-norm, Qwen2 q/k/v bias, SmolLM3 NoPE layers).
head_dim 32 is the smallest vLLM's CPU attention serves, and hidden = heads × head_dim
because vLLM's Qwen2 derives its head size from them.

Token ids from a chat template (transformers 5.x): ``apply_chat_template(...,
tokenize=True)`` returns a ``BatchEncoding`` by default (``return_dict=True``), so use
``tok.apply_chat_template(msgs, tokenize=True)["input_ids"]`` or pass
``return_dict=False`` to get a plain ``list[int]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

__all__ = [
    "TINY_ARCHS",
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "CHAT_TEMPLATE",
    "TINY_VOCAB_SIZE",
    "build_tokenizer",
    "special_token_ids",
    "tiny_config",
    "build_tiny_model",
    "save_tiny_checkpoint",
]

TINY_ARCHS: tuple[str, ...] = ("qwen3", "qwen2", "llama", "smollm3")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

# Model vocab is padded above len(tokenizer) (like real checkpoints pad to a multiple of 64),
# so code that confuses the two sizes gets caught.
TINY_VOCAB_SIZE = 320

# Qwen-style ChatML. Every message renders to a self-contained
# "<|im_start|>role\ncontent<|im_end|>\n" block delimited by special tokens, which is what
# makes the token rendering of messages[:k] a prefix of messages[:k+1] (BPE merges never
# cross a special token). No default system prompt is injected, on purpose: it would make
# rendering depend on whether the first message is a system one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# A handful of fixed merges so the tokenizer is a real (non-trivial) BPE: multi-byte tokens
# appear for common English/ChatML text, but arbitrary bytes still fall back to the
# 256-symbol alphabet. Order matters (it is the merge priority).
_MERGES: tuple[tuple[str, str], ...] = (
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġ", "a"),
    ("i", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("Ġ", "w"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "o"),
    ("i", "s"),
    ("Ġ", "i"),
    ("o", "r"),
    ("Ġ", "c"),
    ("e", "s"),
    ("u", "s"),
    ("e", "m"),
    ("a", "n"),
    ("s", "y"),
    ("sy", "s"),
    ("sys", "t"),
    ("syst", "em"),
    ("a", "s"),
    ("as", "s"),
    ("ass", "is"),
    ("assis", "t"),
    ("assist", "an"),
    ("assistan", "t"),
    ("us", "er"),
)


# Copied from transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for sym in _byte_alphabet():
        vocab[sym] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a, b in _MERGES:
        # A merge is only usable if both halves are already tokens; enforce that at build time
        # so a typo in _MERGES fails loudly instead of silently producing an odd tokenizer.
        if a not in vocab or b not in vocab:
            raise AssertionError(f"merge ({a!r}, {b!r}) references an unknown token")
        merges.append((a, b))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    return vocab, merges


def _build_raw_tokenizer() -> Tokenizer:
    vocab, merges = _build_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # Same pipeline as transformers' Qwen2Tokenizer (which AutoTokenizer forces for model_type
    # "qwen2" whatever tokenizer_config.json says), minus its NFC normalizer: without a
    # normalizer the raw byte stream survives untouched, so round-trips are exact.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen-like byte-level BPE tokenizer with ChatML, built without any download.

    ``clean_up_tokenization_spaces`` is off so ``decode(encode(text)) == text`` holds for
    any unicode string (no special tokens in the text). No BOS is ever prepended.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_raw_tokenizer(),
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="left",
    )
    return tok


def special_token_ids() -> dict[str, int]:
    """Ids of the three special tokens (stable for a given merge list)."""
    vocab, _ = _build_vocab()
    return {t: len(vocab) + i for i, t in enumerate(SPECIAL_TOKENS)}


def _arch_defaults(arch: str) -> dict[str, Any]:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")
    ids = special_token_ids()
    base: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        # Large enough that random logits have real spread (std ~1), so greedy decoding
        # and logit comparisons are meaningful rather than ties between near-equal values.
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        use_cache=True,
    )
    if arch == "qwen3":
        base.update(attention_bias=False)
    elif arch == "llama":
        base.update(attention_bias=False, mlp_bias=False)
    elif arch == "smollm3":
        # SmolLM3Config: no_rope_layers[i] == 1 means layer i uses RoPE, 0 means NoPE.
        base.update(no_rope_layers=[1, 0], attention_bias=False, mlp_bias=False)
    # qwen2: q/k/v bias is hard-wired in Qwen2Attention (bias=True), nothing to set.
    return base


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Config for a tiny ``arch`` model; ``overrides`` replace any default field."""
    kwargs = _arch_defaults(arch)
    kwargs.update(overrides)
    if arch == "smollm3" and "no_rope_layers" not in overrides and kwargs["num_hidden_layers"] != 2:
        # Keep "the last of every pair is NoPE" when the layer count is overridden.
        kwargs["no_rope_layers"] = [int(i % 2 == 0) for i in range(kwargs["num_hidden_layers"])]
    return AutoConfig.for_model(arch, **kwargs)


@torch.no_grad()
def _reinit_(model: PreTrainedModel, seed: int, std: float) -> None:
    """Overwrite every parameter from a private generator.

    Relying on transformers' own ``_init_weights`` would tie determinism to its internals
    (init order, meta-device tricks, skipped inits); a private generator makes weights a
    function of (seed, parameter names/shapes) only. Norm weights and biases get noise too,
    so a loader that drops them (e.g. Qwen2's q/k/v bias, Qwen3's q/k-norm) shows up in logits.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 1 and "norm" in name:
            val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
        else:
            val = std * torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.copy_(val.to(p.dtype))


def build_tiny_model(
    arch: str = "qwen3",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    **config_overrides: Any,
) -> PreTrainedModel:
    """A deterministic random-weight causal LM in eval mode (same seed -> same weights)."""
    config = tiny_config(arch, **config_overrides)
    # fork_rng: model construction draws from the global RNG; don't perturb the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    _reinit_(model, seed, config.initializer_range)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = _generation_config(config)
    model.eval()
    return model


def _generation_config(config: PretrainedConfig) -> GenerationConfig:
    ids = special_token_ids()
    # Like Qwen checkpoints: stop on either <|im_end|> or <|endoftext|>; greedy by default so
    # tests and demos are deterministic.
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )


def save_tiny_checkpoint(
    directory: str | os.PathLike[str],
    arch: str = "qwen3",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a complete offline-loadable checkpoint (model, tokenizer, generation config).

    The chat template is stored inside tokenizer_config.json (legacy layout) rather than
    chat_template.jinja so that older loaders and non-transformers consumers also find it.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(arch, seed=seed, **config_overrides)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path, save_jinja_files=False)
    return path
