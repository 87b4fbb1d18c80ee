"""A conversation as a training episode: the history is written into the state (write view), then
the question is answered from the state alone (read view: writes off, no KV cache of the history).

The write view is rendered turn by turn, each user/assistant pair through the chat template on its
own, which is what a memory-mode client makes the server write (it sends one new turn at a time), so
the adapter learns from the token stream it will see when served.

A keep episode (`keep=True`) is scored against the bare backbone instead of a target: after the same
history, the memory should change nothing in a reply that does not ask for what it holds, so its read
view (a turn, or plain text sent without a session) is written as served and its labelled positions
are matched to the backbone's own next-token distribution (see `trainer.keep_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

IGNORE = -100


@dataclass(frozen=True)
class Episode:
    write_ids: list[int]
    read_ids: list[int]
    labels: list[int]          # read_ids' targets (IGNORE where not scored), same length
    keep: bool = False         # scored against the bare backbone's distribution, not the labels

    @property
    def tokens(self) -> int:
        return len(self.write_ids) + len(self.read_ids)


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template."""
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


def build_episode(tokenizer: Any, messages: Sequence[dict[str, str]], max_write: int = 8192,
                  max_read: int = 512, keep: bool = False) -> Episode:
    """The last message is the target (assistant), the one before it the question (user); everything
    earlier is history. Views are left-truncated to their budgets, as the reference truncates them."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise ValueError("a training conversation ends with a user question and the assistant's answer")
    system = [m for m in messages if m["role"] in ("system", "developer")]
    history = [m for m in messages[:-2] if m["role"] not in ("system", "developer")]
    write: list[int] = render_chat(tokenizer, system, False) if system else []
    i = 0
    while i < len(history):       # a turn: a user message and the assistant reply that follows it
        turn = history[i:i + 2] if i + 1 < len(history) and history[i + 1]["role"] == "assistant" else history[i:i + 1]
        write += render_chat(tokenizer, system + turn, False)[len(render_chat(tokenizer, system, False)) if system else 0:]
        i += len(turn)
    question, answer = messages[-2], messages[-1]
    prompt = render_chat(tokenizer, system + [question], True)
    full = render_chat(tokenizer, system + [question, answer], False)
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template does not render the question as a prefix of question + answer")
    labels = [IGNORE] * len(prompt) + full[len(prompt):]
    return Episode(write[-max_write:], full[-max_read:], labels[-max_read:], keep=keep)


def build_keep_episode(tokenizer: Any, row: dict[str, Any], max_write: int = 8192, max_read: int = 512) -> Episode:
    """A keep row as an episode: `{"messages": [...]}` (history, then a turn whose reply the memory
    must not change) or `{"text": "..."}` (plain text sent without a session: every position scored)."""
    if "text" in row:
        ids = list(tokenizer(row["text"], add_special_tokens=False)["input_ids"])[:max_read]
        if len(ids) < 2:
            raise ValueError("a keep text needs at least two tokens")
        return Episode([], ids, [IGNORE] + ids[1:], keep=True)
    return build_episode(tokenizer, row["messages"], max_write, max_read, keep=True)
