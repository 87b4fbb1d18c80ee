"""Tests for the offline tiny-model factory (delta_mem_vllm.testing.tiny)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast

from delta_mem_vllm.testing.tiny import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    TINY_ARCHS,
    TINY_VOCAB_SIZE,
    build_tiny_model,
    build_tokenizer,
    save_tiny_checkpoint,
    special_token_ids,
    tiny_config,
)

ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "The assistant is the system; user says hi.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nblank lines\n",
    " \n \t\n",
    "héllo wörld ÆØÅ ß ñ",
    "e\u0301 (decomposed, not NFC) \u212b",
    "中文字符 日本語のテキスト 한국어",
    "مرحبا بالعالم עברית",
    "emoji 🌍🚀 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ zero\u200bwidth",
    "digits 1234567890 and punctuation !@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "it's we're they've I'm you'll he'd IT'S",
    "\x00\x01\x7f control chars",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi there! What's 2+2?"},
    {"role": "assistant", "content": "It is 4.\n\nAnything else? 🙂"},
    {"role": "user", "content": "  trailing spaces and newline \n"},
    {"role": "assistant", "content": "Sure — ok."},
]


def _ids(tok, messages, **kw) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_ckpts")
    for arch in TINY_ARCHS:
        save_tiny_checkpoint(root / arch, arch=arch, seed=0)
    return root


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1234)
    pools = [(0x20, 0x7E), (0xA0, 0x2FF), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x0, 0x1F)]
    for _ in range(50):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text


def test_no_bos_added_and_merges_used(tok):
    ids = tok.encode("the system")
    assert tok.bos_token is None
    assert all(i < 256 + 100 for i in ids)  # no special token prepended
    assert len(ids) < len("the system".encode())  # real BPE merges, not bytes only


def test_special_tokens(tok):
    ids = special_token_ids()
    assert ids == {ENDOFTEXT: 288, IM_START: 289, IM_END: 290}
    assert len(tok) == 291
    for text, i in ids.items():
        assert tok.encode(text) == [i]
        assert tok.convert_tokens_to_ids(text) == i
    assert tok.eos_token == IM_END and tok.eos_token_id == ids[IM_END]
    assert tok.pad_token == ENDOFTEXT and tok.pad_token_id == ids[ENDOFTEXT]
    assert tok.encode(f"a{IM_START}b{IM_END}") == [tok.encode("a")[0], ids[IM_START], tok.encode("b")[0], ids[IM_END]]
    assert tok.decode(tok.encode(f"x{IM_END}"), skip_special_tokens=True) == "x"
    assert TINY_VOCAB_SIZE >= len(tok)


# ----------------------------------------------------------------------------- chat template


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there! What's 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.chat_template == CHAT_TEMPLATE


def test_apply_chat_template_return_types(tok):
    # transformers 5.x: tokenize=True returns a BatchEncoding unless return_dict=False.
    enc = tok.apply_chat_template(MESSAGES, tokenize=True)
    assert isinstance(enc, BatchEncoding)
    ids = _ids(tok, MESSAGES)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert list(enc["input_ids"]) == ids
    assert ids == tok.encode(tok.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)


def test_chat_template_prefix_stable(tok):
    full_gen = _ids(tok, MESSAGES, add_generation_prompt=True)
    for k in range(1, len(MESSAGES) + 1):
        ids_k = _ids(tok, MESSAGES[:k])
        assert full_gen[: len(ids_k)] == ids_k
        if k < len(MESSAGES):
            nxt = _ids(tok, MESSAGES[: k + 1])
            assert nxt[: len(ids_k)] == ids_k
        gen_k = _ids(tok, MESSAGES[:k], add_generation_prompt=True)
        assert gen_k[: len(ids_k)] == ids_k
        assert gen_k[len(ids_k) :] == tok.encode(f"{IM_START}assistant\n")


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_config_shape(arch, tok):
    cfg = tiny_config(arch)
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 256, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    # 32: the smallest head size vLLM's CPU attention serves; hidden = heads × head_dim (vLLM's Qwen2)
    assert getattr(cfg, "head_dim", None) == cfg.hidden_size // cfg.num_attention_heads == 32
    assert cfg.vocab_size >= len(tok)
    assert cfg.max_position_embeddings == 4096
    assert cfg.tie_word_embeddings is False
    assert cfg.eos_token_id == tok.eos_token_id
    assert cfg.pad_token_id == tok.pad_token_id
    assert cfg.bos_token_id == special_token_ids()[ENDOFTEXT]
    assert tiny_config(arch, num_hidden_layers=3).num_hidden_layers == 3


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_forward(arch, tok):
    model = build_tiny_model(arch)
    assert not model.training
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([_ids(tok, MESSAGES[:2], add_generation_prompt=True)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.3  # random logits must be distinguishable
    assert (logits[0, -1].topk(2).values.diff().abs() > 1e-3).item()


def test_unknown_arch():
    with pytest.raises(ValueError):
        tiny_config("gpt2")


def test_seed_determinism():
    a = build_tiny_model("qwen3", seed=0).state_dict()
    b = build_tiny_model("qwen3", seed=0).state_dict()
    c = build_tiny_model("qwen3", seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)


def test_build_does_not_touch_global_rng():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_model("llama", seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_attn_impl():
    m = build_tiny_model("qwen3", dtype=torch.bfloat16, attn_implementation="sdpa")
    assert m.dtype == torch.bfloat16
    assert m.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_eager_matches_sdpa(arch):
    ids = torch.randint(0, 288, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e = build_tiny_model(arch, attn_implementation="eager")(ids).logits
        s = build_tiny_model(arch, attn_implementation="sdpa")(ids).logits
    torch.testing.assert_close(e, s, atol=1e-4, rtol=1e-4)


def test_smollm3_has_nope_layer():
    model = build_tiny_model("smollm3")
    assert list(model.config.no_rope_layers) == [1, 0]
    assert model.model.layers[0].self_attn.use_rope
    assert not model.model.layers[1].self_attn.use_rope

    # Functional check: with every layer NoPE, logits ignore absolute positions; with the
    # default (layer 0 RoPE) they don't.
    ids = torch.tensor([[5, 70, 80, 90, 100, 110]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        all_nope = build_tiny_model("smollm3", no_rope_layers=[0, 0])
        torch.testing.assert_close(
            all_nope(ids, position_ids=pos).logits, all_nope(ids, position_ids=pos + 100).logits
        )
        assert not torch.allclose(model(ids, position_ids=pos).logits, model(ids, position_ids=pos + 100).logits)


def test_qwen2_has_qkv_bias():
    attn = build_tiny_model("qwen2").model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().sum() > 0
    assert attn.o_proj.bias is None
    for arch in ("qwen3", "llama", "smollm3"):
        assert build_tiny_model(arch).model.layers[0].self_attn.q_proj.bias is None


def test_qwen3_has_qk_norm():
    attn = build_tiny_model("qwen3").model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (32,)
    assert not torch.allclose(attn.q_norm.weight, torch.ones(32))  # perturbed, so loading is tested


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_checkpoint_files(arch, ckpt_root, tok):
    d = ckpt_root / arch
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / name).is_file(), name
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == CHAT_TEMPLATE
    assert tcfg["eos_token"] == IM_END and tcfg["pad_token"] == ENDOFTEXT
    gcfg = json.loads((d / "generation_config.json").read_text())
    assert gcfg["eos_token_id"] == [tok.eos_token_id, tok.pad_token_id]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["eos_token_id"] == tok.eos_token_id
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys  # untied
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) == (arch == "qwen2")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_checkpoint_reproduces_logits(arch, attn, ckpt_root):
    loaded = AutoModelForCausalLM.from_pretrained(
        ckpt_root / arch, attn_implementation=attn, local_files_only=True
    ).eval()
    ref = build_tiny_model(arch, seed=0, attn_implementation=attn)
    assert loaded.dtype == torch.float32
    assert type(loaded) is type(ref)
    ids = torch.randint(0, 291, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_checkpoint_tokenizer(arch, ckpt_root, tok):
    d = ckpt_root / arch
    auto = AutoTokenizer.from_pretrained(d, local_files_only=True)
    exact = PreTrainedTokenizerFast.from_pretrained(d, local_files_only=True)
    for loaded in (auto, exact):
        assert loaded.chat_template == CHAT_TEMPLATE
        assert len(loaded) == len(tok)
        assert loaded.eos_token_id == tok.eos_token_id and loaded.pad_token_id == tok.pad_token_id
        assert loaded.bos_token_id is None
        assert _ids(loaded, MESSAGES, add_generation_prompt=True) == _ids(tok, MESSAGES, add_generation_prompt=True)
        for text in ROUND_TRIP_TEXTS:
            if loaded is auto and unicodedata.normalize("NFC", text) != text:
                continue  # see test_qwen2_autotokenizer_is_nfc
            assert loaded.encode(text) == tok.encode(text), text
            assert loaded.decode(loaded.encode(text)) == text


def test_qwen2_autotokenizer_is_nfc(ckpt_root, tok):
    """transformers 5.x forces Qwen2Tokenizer (with an NFC normalizer) for model_type qwen2.

    Documents the one known divergence: non-NFC text is normalized on encode there. Load with
    PreTrainedTokenizerFast.from_pretrained for an exact round-trip on every checkpoint.
    """
    auto = AutoTokenizer.from_pretrained(ckpt_root / "qwen2", local_files_only=True)
    text = "e\u0301"
    assert auto.decode(auto.encode(text)) == unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode(text)) == text
