"""Per-token message / sentence ids for the segment write granularities.

`message_mean` (SSW) and `sentence_mean` adapters write one mean hidden per segment, so the runtime
must label every prompt token with the segment it belongs to. The labels must match the reference
runtime exactly — a different split changes which hiddens are averaged and therefore the state —
so this module reproduces its algorithm, including its fallbacks:

* the chat is rendered incrementally (messages[:i+1], no generation prompt) and each message owns
  the tokens its render adds (role header, content and end-of-turn tokens alike);
* a template may re-render up to `max_rollback` already emitted tokens (e.g. a marker on the last
  turn); beyond that the per-message spans are meaningless and we refuse;
* sentence ids are only assigned where the content tokenises identically inside the template,
  otherwise the message (or its content) degrades to coarser ids instead of misaligned ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_TEMPLATE_ROLLBACK",
    "ChatSegments",
    "split_sentences",
    "chat_segment_ids",
    "generated_token_ids",
    "count_non_system_messages",
    "common_prefix_len",
]

# The reference runtime's tolerance for re-rendered tokens between incremental renders.
MAX_TEMPLATE_ROLLBACK = 16

# A boundary is a run of >= 2 newlines, or the whitespace after sentence punctuation, with any closing
# quotes/brackets that follow the punctuation. Matches start right after the punctuation (or right
# before the newline run), and the matched characters open the next chunk.
_BOUNDARY = re.compile(r"\n{2,}|(?<=[.!?;:])[\"')\]\u201d\u2019]*\s+")


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentence chunks whose concatenation is exactly `text`.

    Boundary characters are attached to the *following* chunk so that a chunk's tokenisation tends
    to be a slice of the whole text's (byte-level BPE glues leading spaces to the next word).
    """
    if not text:
        return [text]
    chunks: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        cut = match.start()
        if cut > start:
            chunks.append(text[start:cut])
            start = cut
    if start < len(text):
        chunks.append(text[start:])
    return chunks or [text]


@dataclass
class ChatSegments:
    """Token ids of a rendered chat with the write-segment label of every token (−1 = no segment)."""

    input_ids: list[int]
    message_ids: list[int]
    sentence_ids: list[int]

    def __post_init__(self) -> None:
        if not len(self.input_ids) == len(self.message_ids) == len(self.sentence_ids):
            raise ValueError("input_ids, message_ids and sentence_ids must have the same length")

    def __len__(self) -> int:
        return len(self.input_ids)


def count_non_system_messages(messages: Sequence[Mapping[str, Any]]) -> int:
    """Message ids count only non-system messages, so this is also the next message id."""
    return sum(1 for m in messages if m.get("role") != "system")


def _as_id_list(rendered: Any) -> list[int]:
    # Tolerate the shapes apply_chat_template has returned across transformers versions.
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    if rendered and isinstance(rendered[0], (list, tuple)):
        if len(rendered) != 1:
            raise ValueError("expected a single rendered conversation")
        rendered = rendered[0]
    return [int(t) for t in rendered]


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
            template_kwargs: Mapping[str, Any]) -> list[int]:
    return _as_id_list(tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt,
        **template_kwargs))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find(haystack: Sequence[int], needle: Sequence[int]) -> int | None:
    """First start of `needle` as a contiguous run in `haystack` (the reference takes the first)."""
    n = len(needle)
    for start in range(len(haystack) - n + 1):
        if haystack[start:start + n] == needle:
            return start
    return None


def _sentence_labels(tokenizer: Any, content: Any, delta: Sequence[int], next_id: int) -> tuple[list[int], int]:
    """Sentence ids for one message's delta tokens and the updated global counter."""
    labels = [-1] * len(delta)
    if not isinstance(content, str):
        # Structured (multi-part) content has no single text to align; leave it unsegmented.
        return labels, next_id
    content_ids = _encode(tokenizer, content)
    if not content_ids:
        return labels, next_id
    start = _find(delta, content_ids)
    if start is None:
        # The template changed the content's tokens (trimmed, re-merged...): no reliable alignment.
        return labels, next_id
    chunk_ids = [_encode(tokenizer, chunk) for chunk in split_sentences(content)]
    if [t for ids in chunk_ids for t in ids] != content_ids:
        # A merge crosses a sentence boundary: one sentence for the whole content beats misalignment.
        labels[start:start + len(content_ids)] = [next_id] * len(content_ids)
        return labels, next_id + 1
    pos = start
    for ids in chunk_ids:
        if ids:
            labels[pos:pos + len(ids)] = [next_id] * len(ids)
            pos += len(ids)
            next_id += 1
    return labels, next_id


def _delta(previous: list[int], current: list[int], max_rollback: int, what: str) -> int:
    prefix = common_prefix_len(previous, current)
    rollback = len(previous) - prefix
    if rollback > max_rollback:
        raise ValueError(
            f"chat template is not prefix-stable ({what} re-renders {rollback} earlier tokens, more than "
            f"{max_rollback}); per-message write spans cannot be recovered")
    return prefix


def chat_segment_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                     sentences: bool = False, max_rollback: int = MAX_TEMPLATE_ROLLBACK,
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> ChatSegments:
    """Render `messages` and label every token as the reference runtime does.

    System messages get −1; the k-th non-system message gets id k on all of its delta tokens
    (template tokens included); generation-prompt tokens get −1. With `sentences=True` content tokens
    get globally numbered sentence ids (template tokens −1), else every sentence id is −1.
    `chat_template_kwargs` are passed to the template (e.g. `enable_thinking=False`), and must be the
    same ones the serving path renders with, or the ids will not line up with the prompt.
    """
    if not messages:
        # transformers refuses to render an empty conversation; there is nothing to label anyway.
        raise ValueError("messages must not be empty")
    kwargs = dict(chat_template_kwargs or {})
    input_ids: list[int] = []
    message_ids: list[int] = []
    sentence_ids: list[int] = []
    next_message = 0
    next_sentence = 0

    def splice(current: list[int], prefix: int) -> list[int]:
        # Rolled-back tokens lose their labels; the re-rendered ones are owned by the new step.
        del input_ids[prefix:], message_ids[prefix:], sentence_ids[prefix:]
        delta = current[prefix:]
        input_ids.extend(delta)
        return delta

    for i, message in enumerate(messages):
        current = _render(tokenizer, messages[:i + 1], False, kwargs)
        delta = splice(current, _delta(input_ids, current, max_rollback, f"message {i}"))
        if message.get("role") == "system":
            message_ids.extend([-1] * len(delta))
            sentence_ids.extend([-1] * len(delta))
            continue
        message_ids.extend([next_message] * len(delta))
        next_message += 1
        if sentences:
            labels, next_sentence = _sentence_labels(tokenizer, message.get("content"), delta, next_sentence)
        else:
            labels = [-1] * len(delta)
        sentence_ids.extend(labels)

    if add_generation_prompt:
        full = _render(tokenizer, messages, True, kwargs)
        prompt = splice(full, _delta(input_ids, full, max_rollback, "the generation prompt"))
        message_ids.extend([-1] * len(prompt))
        sentence_ids.extend([-1] * len(prompt))
    else:
        full = current
    if input_ids != full:
        # Cannot happen with a deterministic template; guards against a stateful/random one.
        raise RuntimeError("incremental chat rendering does not reproduce the full rendering")
    return ChatSegments(input_ids=input_ids, message_ids=message_ids, sentence_ids=sentence_ids)


def generated_token_ids(segments: ChatSegments, num_non_system_messages: int) -> tuple[int, int]:
    """(message id, sentence id) for decode tokens of the reply being generated.

    The reply is the next non-system message, so its id is the current non-system count; it is one
    new sentence after every sentence seen so far (0 when none was labelled, as in the reference).
    """
    active = [s for s in segments.sentence_ids if s >= 0]
    return num_non_system_messages, (max(active) + 1 if active else 0)
