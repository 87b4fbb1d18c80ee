"""Offline demo: a tiny random model with a Δ-Mem adapter, two chat turns, the memory state changing.

    python -m delta_mem_vllm.demo [--workdir DIR]

Builds the model, tokenizer and adapter locally (nothing is downloaded), then runs two turns in
"memory mode": each turn sends only its new message; the state carries the conversation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from .hf import DeltaMemModel
from .testing.adapters import save_random_adapter
from .testing.tiny import save_tiny_checkpoint


def greedy_turn(dm: DeltaMemModel, tokenizer, state: torch.Tensor, text: str, max_new_tokens: int = 12):
    """Write one user turn and the reply into the state; return (reply ids, new state)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    ids = torch.tensor([prompt])
    out = dm(ids, state=state[None], use_cache=True)
    reply: list[int] = []
    while True:
        token = int(out.logits[0, -1].argmax())
        reply.append(token)
        if token == tokenizer.eos_token_id or len(reply) >= max_new_tokens:
            return reply, out.state[0]
        out = dm(torch.tensor([[token]]), state=out.state, past_key_values=out.past_key_values, use_cache=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="Δ-Mem offline demo on a tiny random model")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the model (default: a temp dir)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        model_dir = save_tiny_checkpoint(root / "tiny-qwen3", "qwen3")
        adapter_dir = save_random_adapter(model_dir, root / "tiny-adapter")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dm = DeltaMemModel.from_pretrained(model_dir, adapter_dir)
        print(f"model: {model_dir}  adapter: {adapter_dir}")
        print(f"Δ-Mem layers: {len(dm.layer_names)}  state per session: {tuple(dm.state_shape)} fp32 "
              f"({dm.zero_state().numel() * 4} bytes)  adapter fingerprint {dm.adapter_fingerprint[:12]}…")
        state = dm.zero_state()
        for turn, text in enumerate(["My name is Ada and I like tea.", "What is my name?"], start=1):
            before = state
            reply, state = greedy_turn(dm, tokenizer, state, text)
            norms = ", ".join(f"{n:.3f}" for n in state.flatten(1).norm(dim=1).tolist())
            print(f"turn {turn}: user {text!r}")
            print(f"  reply ids {reply} → {tokenizer.decode(reply)!r} (random weights: gibberish is expected)")
            print(f"  state norm per layer [{norms}], changed by {float((state - before).norm()):.4f}")
        saved = dm.save_state(root / "session-state", state)
        assert torch.equal(dm.load_state(saved), state)
        print(f"state saved to {saved} (safetensors + manifest) and reloaded bit-exactly")


if __name__ == "__main__":
    main()
