"""The memory-mode split (context-only vs new) and the turn token layout, without a server."""

from __future__ import annotations

import pytest

from delta_mem_vllm.testing.tiny import build_tokenizer
from server.prompt import ChatMessage, build_chat_turn, build_text_turn, render, split_messages

S = ChatMessage("system", "be brief")
U1, A1, U2, A2, U3 = (ChatMessage("user", "one"), ChatMessage("assistant", "uno"), ChatMessage("user", "two"),
                      ChatMessage("assistant", "dos"), ChatMessage("user", "three"))


def log(*msgs: ChatMessage) -> list[str]:
    return [m.log_entry() for m in msgs]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_first_turn_everything_new():
    assert split_messages([S, U1], [], []) == 0
    assert split_messages([U1], [], []) == 0


def test_memory_mode_only_new_turn():
    # system written before -> context-only; the new user message is new
    assert split_messages([S, U2], log(U1, A1), log(S)) == 1
    assert split_messages([U2], log(U1, A1), log(S)) == 0


def test_whole_history_and_last_two_turns():
    assert split_messages([S, U1, A1, U2], log(U1, A1), log(S)) == 3
    assert split_messages([S, U1, A1, U2, A2, U3], log(U1, A1, U2, A2), log(S)) == 5
    # last two turns: leading run equals the log's trailing run
    assert split_messages([U2, A2, U3], log(U1, A1, U2, A2), log(S)) == 2


def test_last_message_is_always_new():
    # a repeated message equal to the log's tail is still written
    assert split_messages([U1], log(U1), []) == 0
    assert split_messages([A1, A1], log(U1, A1), []) == 1
    # the leading run must match the log's *trailing* run: [U1] is not the tail of [U1, A1]
    assert split_messages([U1, A1], log(U1, A1), []) == 0


def test_longest_leading_run_wins():
    # log ... X Y X Y ; request X Y X Y Z -> 4 context messages
    x, y, z = ChatMessage("user", "x"), ChatMessage("assistant", "y"), ChatMessage("user", "z")
    assert split_messages([x, y, x, y, z], log(x, y, x, y), []) == 4
    assert split_messages([x, y, z], log(x, y, x, y), []) == 2


def test_mismatching_history_is_written():
    edited = ChatMessage("assistant", "edited")
    assert split_messages([U1, edited, U2], log(U1, A1), []) == 0


def test_unwritten_system_message_is_new():
    other = ChatMessage("system", "new rules")
    assert split_messages([other, U2], log(U1, A1), log(S)) == 0
    # a new system message after the matched history starts the new part there
    assert split_messages([U1, A1, other, U2], log(U1, A1), log(S)) == 2


def test_developer_role_counts_as_system(tok):
    dev = ChatMessage("developer", "be brief")
    assert split_messages([dev, U2], [], log(dev)) == 1
    assert render(tok, [dev], False) == render(tok, [ChatMessage("system", "be brief")], False)


def test_chat_turn_layout(tok):
    msgs = [S, U1, A1, U2]
    full = render(tok, msgs, True)
    ctx = render(tok, msgs[:3], False)
    turn = build_chat_turn(tok, msgs, 3, pending=[7, 8])
    assert turn.write_start == len(ctx) == turn.num_context
    assert turn.token_ids == full[:len(ctx)] + [7, 8] + full[len(ctx):]
    assert turn.num_pending == 2
    assert turn.num_written_prompt == len(full) - len(ctx) + 2


def test_memory_mode_turn_layout(tok):
    turn = build_chat_turn(tok, [U2], 0, pending=[5])
    assert turn.write_start == 0 and turn.token_ids == [5] + render(tok, [U2], True)


def test_text_turn_layout():
    turn = build_text_turn([1, 2, 3], pending=[9])
    assert turn.token_ids == [9, 1, 2, 3] and turn.write_start == 0
