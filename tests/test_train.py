"""Training Δ-Mem adapters: the recall data (held-out values never trained on), LoCoMo loading,
episodes (what is written, what is scored), and the training loop on a tiny model — the answer loss
falls, gradients reach the write path through the scan, both adapter formats and the card are
written, and a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from delta_mem_vllm.adapter import load_adapter
from delta_mem_vllm.hf.model import DeltaMemModel, find_attention_modules
from delta_mem_vllm.testing.tiny import build_tiny_model, build_tokenizer
from delta_mem_vllm.train.data import KINDS, POOLS, conversation, load_locomo, pool
from delta_mem_vllm.train.episodes import IGNORE, build_episode, build_keep_episode
from delta_mem_vllm.config import DeltaMemConfig
from delta_mem_vllm.testing.adapters import randomize_
from delta_mem_vllm.train.prefix import build_prefix
from delta_mem_vllm.train.trainer import (EpisodeRunner, TrainConfig, _AttentionInputs, decorrelate_memory_projections,
                                          episode_loss, evaluate, evaluate_keep, kl_to_backbone, lr_at, train)


def test_held_out_values_never_appear_in_training_conversations():
    for kind in POOLS:
        assert pool(kind, "train") and pool(kind, "heldout")
        assert not set(pool(kind, "train")) & set(pool(kind, "heldout"))
    rng = random.Random(0)
    held = {v for k in POOLS for v in pool(k, "heldout")}
    for _ in range(300):
        row = conversation(rng, "train", min_gap=3)
        text = " ".join(m["content"] for m in row["messages"])
        assert not {w for w in re.findall(r"[\w']+", text) if len(w) > 3} & held
        assert row["gap"] >= 3 and row["answer"] in row["messages"][-1]["content"]
        user_turns = [m["content"] for m in row["messages"][:-2] if m["role"] == "user"]
        told = [i for i, t in enumerate(user_turns) if row["answer"] in t]
        assert told and len(user_turns) - told[-1] >= 3       # told at least 3 user turns before the question
    assert {conversation(random.Random(s), "heldout")["kind"] for s in range(200)} == set(KINDS)


def test_without_faker_the_generator_says_what_to_install(monkeypatch):
    from delta_mem_vllm.train import data

    monkeypatch.setattr(data, "_FAKER", {})
    with pytest.raises(RuntimeError, match=r"delta-mem-vllm\[train\]"):
        next(data.conversations(1, "train", 0))
    # closed sets are built in: no Faker needed
    assert next(data.conversations(1, "train", 0, values="closed"))["values"] == "closed"


def test_closed_set_conversations_draw_from_eight_values_and_tell_at_most_max_facts():
    from delta_mem_vllm.train.data import CLOSED_POOLS, conversations

    assert all(len(set(v)) == 8 for v in CLOSED_POOLS.values()) and set(CLOSED_POOLS) == set(KINDS)
    for split in ("train", "heldout"):
        rows = list(conversations(200, split, 0, values="closed", max_facts=1, min_gap=3))
        assert all(r["answer"] in CLOSED_POOLS[r["kind"]] and r["gap"] >= 3 for r in rows)
        for r in rows:     # one fact told (and perhaps updated): every told value is of the asked kind
            kinds = told_kinds(r)
            assert kinds == {r["kind"]}, (kinds, r["kind"])
        assert {r["kind"] for r in rows} == set(KINDS)
    assert max(len(told_kinds(r)) for r in conversations(200, "train", 0, values="closed")) == 3   # default: 1-3


def told_kinds(row: dict) -> set[str]:
    from delta_mem_vllm.train.data import CLOSED_POOLS

    said = " ".join(m["content"] for m in row["messages"][:-2] if m["role"] == "user")
    return {k for k, values in CLOSED_POOLS.items() for v in values if re.search(rf"\b{v}\b", said)}


def test_locomo_rows(tmp_path):
    sample = {"conversation": {"speaker_a": "Ann", "speaker_b": "Bo", "session_1_date_time": "1 May 2023",
                               "session_1": [{"speaker": "Ann", "text": "I adopted a cat."},
                                             {"speaker": "Bo", "text": "Nice!"},
                                             {"speaker": "Bo", "text": "Name?"}],
                               "session_2_date_time": "9 May 2023",
                               "session_2": [{"speaker": "Ann", "text": "Her name is Tig."}]},
              "qa": [{"question": "What is the cat's name?", "answer": "Tig", "category": 1},
                     {"question": "Adversarial?", "adversarial_answer": "x", "category": 5}]}
    path = tmp_path / "locomo10.json"
    path.write_text(json.dumps([sample]))
    (row,) = load_locomo(path)
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert row["messages"][0]["content"] == "[1 May 2023] I adopted a cat."
    assert row["messages"][1]["content"] == "Nice!\nName?" and row["answer"] == "Tig"


def test_an_episode_writes_the_history_turn_by_turn_and_scores_the_answer():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada."},
            {"role": "user", "content": "Nice day."}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Ada."}]
    ep = build_episode(tok, msgs)
    per_turn = [tok.apply_chat_template(msgs[i:i + 2], tokenize=True, return_dict=False) for i in (0, 2)]
    assert ep.write_ids == per_turn[0] + per_turn[1]
    scored = [t for t in ep.labels if t != IGNORE]
    assert tok.decode(scored).startswith("Ada.") and len(ep.labels) == len(ep.read_ids)
    assert "name is Ada" not in tok.decode(ep.read_ids)          # the history reaches the read view only via the state
    assert build_episode(tok, msgs, max_write=5).write_ids == ep.write_ids[-5:]
    with pytest.raises(ValueError):
        build_episode(tok, msgs[:-1])


def _tiny():
    return build_tiny_model("llama", seed=0), build_tokenizer()


def _episodes(tok, n=6):
    rng = random.Random(1)
    return [build_episode(tok, conversation(rng, "train", min_gap=1, max_turns=3)["messages"]) for _ in range(n)]


def test_gradients_reach_the_write_path_through_the_scan():
    model, tok = _tiny()
    dm = DeltaMemModel(model)
    gates = _AttentionInputs(dm)
    with torch.no_grad():   # non-zero read heads, so the read view depends on the state
        for layer in dm.layers:
            layer.delta_o_proj.normal_(0, 0.3)
            layer.delta_q_proj.normal_(0, 0.3)
    loss, _ = episode_loss(EpisodeRunner(dm), 0, _episodes(tok, 1)[0], gates, TrainConfig())
    loss.backward()
    assert all(layer.memory_k_proj.grad is not None and layer.memory_k_proj.grad.abs().sum() > 0 for layer in dm.layers)
    assert all(p.grad is None for p in dm.model.parameters())      # the backbone stays frozen


def test_decorrelated_init_takes_the_mean_input_direction_out_of_the_memory_projections():
    model, tok = _tiny()
    dm = DeltaMemModel(model)
    eps = _episodes(tok, 4)
    means = {}
    modules = dict(find_attention_modules(dm.model, dm.config))
    hooks = [modules[name].register_forward_pre_hook(
        (lambda i: lambda m, a, kw: means.setdefault(i, []).append(kw["hidden_states"][0]))(i), with_kwargs=True)
        for i, name in enumerate(dm.layer_names)]
    with torch.no_grad():
        for ep in eps:
            dm(torch.tensor([ep.write_ids]), write=False)
    for h in hooks:
        h.remove()
    v_before = dm.layers[0].memory_v_proj.detach().clone()
    decorrelate_memory_projections(dm, eps)
    for i, layer in enumerate(dm.layers):
        mu = F.normalize(torch.cat(means[i]).mean(0), dim=0)
        for w in (layer.memory_q_proj, layer.memory_k_proj, layer.memory_v_proj):
            assert (w @ mu).abs().max() < 1e-5 * w.abs().max()
    # only the mean direction is removed: the rest of each projection is untouched
    mu0 = F.normalize(torch.cat(means[0]).mean(0), dim=0)
    assert torch.allclose(dm.layers[0].memory_v_proj, v_before - torch.outer(v_before @ mu0, mu0), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_top_layers_on_the_cached_prefix_equal_the_whole_model(arch):
    model = build_tiny_model(arch, seed=0, num_hidden_layers=4)
    dm = DeltaMemModel(model, DeltaMemConfig(target_layers=(2, 3), beta_bias_init=-1.0))
    randomize_(dm, seed=1)
    assert dm.first_memory_layer == 2
    ids = torch.randint(0, 200, (1, 13))
    state = torch.randn(1, *dm.state_shape) * 0.3
    h = dm.hidden_states_before(ids, 2)
    with torch.no_grad():
        assert torch.equal(h, dm.model(ids, output_hidden_states=True).hidden_states[2])
        for write in (True, False):
            full = dm(ids, state=state, write=write)
            top = dm.forward_from(h, 2, state=state, write=write)
            assert torch.allclose(top.logits, full.logits, atol=1e-5)
            assert torch.allclose(top.state, full.state, atol=1e-6)
        assert torch.allclose(dm.forward_from(dm.hidden_states_before(ids, 1), 1, state=state, write=False,
                                              logits_to_keep=3).logits,
                              full.logits[:, -3:], atol=1e-5)
    # every decoder layer is back in place afterwards
    assert len(dm.model.model.layers) == 4
    with pytest.raises(ValueError, match="decoder layer 2"):
        dm.forward_from(dm.hidden_states_before(ids, 3), 3)


def test_training_on_the_frozen_prefix_gives_the_same_adapter_and_reuses_its_cache(tmp_path, caplog):
    model, tok = _tiny()
    eps = _episodes(tok, 4)
    cfg = TrainConfig(steps=3, grad_accum=2, lr=3e-3, save_every=0, eval_every=0, seed=3, decorrelate_init=2)
    start = DeltaMemConfig(target_layers=(1,), alpha=64, beta_bias_init=-3.0)
    with caplog.at_level("INFO", logger="delta_mem_vllm.train"):
        cached = train(model, eps, tmp_path / "cached", cfg, start, progress_bar=False, eval_episodes=eps[:2])
    assert "layers 0-0 are run once per conversation" in caplog.text
    assert (tmp_path / "cached" / "frozen-prefix.pt").exists() and (tmp_path / "cached" / "frozen-prefix-eval.pt").exists()
    whole = train(build_tiny_model("llama", seed=0), eps, tmp_path / "whole",
                  TrainConfig(**{**cfg.__dict__, "frozen_prefix": False}), start, progress_bar=False,
                  eval_episodes=eps[:2])
    assert not (tmp_path / "whole" / "frozen-prefix.pt").exists()
    a, b = load_adapter(cached), load_adapter(whole)
    assert all(torch.allclose(a.tensors[k], b.tensors[k], atol=1e-5) for k in a.tensors)
    ca, cb = (json.loads((d / "training_card.json").read_text()) for d in (cached, whole))
    assert [x[2] for x in ca["loss_curve"]] == pytest.approx([x[2] for x in cb["loss_curve"]], abs=1e-4)
    assert ca["heldout_eval"][-1]["ce"] == pytest.approx(cb["heldout_eval"][-1]["ce"], abs=1e-4)
    # the saved cache is what a resumed run loads; a different layer is not taken from it
    dm = DeltaMemModel(build_tiny_model("llama", seed=0), start)
    caplog.clear()
    with caplog.at_level("INFO", logger="delta_mem_vllm.train"):
        again = build_prefix(dm, eps, 1, tmp_path / "cached" / "frozen-prefix.pt", progress_bar=False)
        assert "loaded from" in caplog.text
        assert all(torch.equal(w, dm.hidden_states_before(torch.tensor([ep.write_ids]), 1)[0])
                   for (w, _), ep in zip(again, eps))
        caplog.clear()
        build_prefix(dm, eps[:1], 1, tmp_path / "other.pt", progress_bar=False)
        assert "loaded from" not in caplog.text
        # more data: only the new conversations are computed, and the cache then holds them all
        more = eps + _episodes(tok, 6)[4:]
        caplog.clear()
        grown = build_prefix(dm, more, 1, tmp_path / "cached" / "frozen-prefix.pt", progress_bar=False)
        assert "4 of 6 conversations loaded" in caplog.text and "2 conversations" in caplog.text
        assert all(torch.equal(r, dm.hidden_states_before(torch.tensor([ep.read_ids]), 1)[0])
                   for (_, r), ep in zip(grown, more))
        caplog.clear()
        build_prefix(dm, more[::-1], 1, tmp_path / "cached" / "frozen-prefix.pt", progress_bar=False)
        assert "6 of 6 conversations loaded" in caplog.text
        caplog.clear()
        build_prefix(dm, more, 0, tmp_path / "cached" / "frozen-prefix.pt", progress_bar=False)
        assert "loaded from" not in caplog.text          # another layer's residual stream is not taken


def test_a_read_view_that_writes_is_a_served_turn():
    model, tok = _tiny()
    dm = DeltaMemModel(model)
    randomize_(dm, seed=2)
    eps = _episodes(tok, 2)
    with torch.no_grad():
        got = evaluate(dm, eps, read_writes=True)
        read_only = evaluate(dm, eps)
        nll = n = 0
        for ep in eps:
            state = dm(torch.tensor([ep.write_ids])).state
            logits = dm(torch.tensor([ep.read_ids]), state=state, write=True).logits[0, :-1]
            nll += float(F.cross_entropy(logits, torch.tensor(ep.labels[1:]), ignore_index=IGNORE, reduction="sum"))
            n += sum(t != IGNORE for t in ep.labels[1:])
    assert got["ce"] == pytest.approx(nll / n, abs=1e-3) and got["ce"] != read_only["ce"]


KEEP_ROWS = [
    {"messages": [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why not."}]},
    {"messages": [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada."},
                  {"role": "user", "content": "Nice day."}, {"role": "assistant", "content": "Yes it is."}]},
    {"text": "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."},
]


def test_a_keep_episode_scores_a_served_turn_or_every_position_of_a_text():
    tok = build_tokenizer()
    alone, after, text = (build_keep_episode(tok, row) for row in KEEP_ROWS)
    assert alone.keep and after.keep and text.keep
    assert alone.write_ids == [] and after.write_ids == build_episode(tok, KEEP_ROWS[1]["messages"]).write_ids
    assert tok.decode([t for t in after.labels if t != IGNORE]).startswith("Yes it is.")
    ids = tok(KEEP_ROWS[2]["text"], add_special_tokens=False)["input_ids"]
    assert text.write_ids == [] and text.read_ids == ids and text.labels == [IGNORE] + ids[1:]
    with pytest.raises(ValueError):
        build_keep_episode(tok, {"text": ""})


def test_kl_to_backbone():
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    assert float(kl_to_backbone(a, a)) == 0.0
    want = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="batchmean")
    assert float(kl_to_backbone(a, b)) == pytest.approx(float(want), rel=1e-5) and float(want) > 0


def test_the_keep_loss_is_the_kl_to_the_bare_backbone_and_training_brings_the_memory_back_to_it(tmp_path):
    model, tok = _tiny()
    keep = [build_keep_episode(tok, row) for row in KEEP_ROWS]
    dm = DeltaMemModel(model)
    run, gates, cfg = EpisodeRunner(dm), _AttentionInputs(dm), TrainConfig(reg_weight=0)
    # a fresh adapter (zero output maps) changes nothing: nothing to keep
    assert all(episode_loss(run, i, ep, gates, cfg)[1] == 0.0 for i, ep in enumerate(keep))
    randomize_(dm, seed=2)
    bare = build_tiny_model("llama", seed=0).requires_grad_(False)
    for i, ep in enumerate(keep):
        n = len(ep.read_ids) - next(j for j, t in enumerate(ep.labels) if t != IGNORE) + 1
        with torch.no_grad():
            teacher = bare(torch.tensor([ep.read_ids])).logits[0, -n:-1]
            state = dm(torch.tensor([ep.write_ids])).state if ep.write_ids else None
            served = dm(torch.tensor([ep.read_ids]), state=state, write=True).logits[0, -n:-1]   # the turn writes
        loss, kl = episode_loss(run, i, ep, gates, TrainConfig(reg_weight=0, keep_weight=0.5))
        assert kl == pytest.approx(float(kl_to_backbone(served, teacher)), rel=1e-4) and kl > 1e-3
        assert float(loss.detach()) == pytest.approx(0.5 * kl, rel=1e-5)
    before = evaluate_keep(run, keep)
    assert before == pytest.approx(sum(episode_loss(run, i, ep, gates, cfg)[1] for i, ep in enumerate(keep)) / 3,
                                   rel=1e-3)
    # mixed into recall training: the loss curve carries both terms, the held-out KL falls
    recall = _episodes(tok, 4)
    out = train(build_tiny_model("llama", seed=0), recall + keep, tmp_path / "run",
                TrainConfig(steps=20, grad_accum=2, lr=3e-3, save_every=0, eval_every=10, seed=3, reg_weight=0,
                            keep_weight=4),
                dm.adapter(), progress_bar=False, eval_episodes=recall[:2] + keep)
    card = json.loads((out / "training_card.json").read_text())
    assert any(x[2] is not None for x in card["loss_curve"]) and any(x[3] is not None for x in card["loss_curve"])
    assert [e["step"] for e in card["heldout_eval"]] == [10, 20]
    assert card["heldout_eval"][-1]["keep_kl"] < 0.5 * before, (before, card["heldout_eval"])
    assert 0 <= card["heldout_eval"][-1]["exact"] <= 1         # recall metrics over the recall episodes only


def test_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) < 1e-5 and lr_at(55, cfg) == pytest.approx(5e-4, rel=0.05)


def test_training_lowers_the_answer_loss_and_resumes_exactly(tmp_path):
    model, tok = _tiny()
    eps = _episodes(tok)
    cfg = TrainConfig(steps=24, grad_accum=2, lr=3e-3, save_every=6, eval_every=12, seed=3)
    adapter_dir = train(model, eps, tmp_path / "a", cfg, data_note="6 tiny recall episodes", progress_bar=False,
                        eval_episodes=eps[:3])
    card = json.loads((adapter_dir / "training_card.json").read_text())
    curve = [x[2] for x in card["loss_curve"]]
    assert len(curve) == 24 and sum(curve[-4:]) / 4 < 0.7 * sum(curve[:4]) / 4, curve
    # evaluated at steps 12 and 24; a zero state is the bare model, and the trained memory beats it
    assert [e["step"] for e in card["heldout_eval"]] == [12, 24]
    assert card["heldout_eval"][-1]["ce"] < card["heldout_zero_state"]["ce"]
    fresh = build_tiny_model("llama", seed=0).requires_grad_(False)
    bare = [F.cross_entropy(fresh(torch.tensor([ep.read_ids])).logits[0, :-1], torch.tensor(ep.labels[1:]),
                            reduction="sum", ignore_index=IGNORE) for ep in eps[:3]]
    scored = sum(sum(t != IGNORE for t in ep.labels[1:]) for ep in eps[:3])
    assert card["heldout_zero_state"]["ce"] == pytest.approx(float(sum(bare)) / scored, abs=1e-3)
    # exact: the share of answers whose every scored token is the top choice
    exact = [all(int(t) == int(p) for t, p in zip(ep.labels[1:], fresh(torch.tensor([ep.read_ids])).logits[0, :-1]
                                                    .argmax(-1)) if t != IGNORE) for ep in eps[:3]]
    assert card["heldout_zero_state"]["exact"] == pytest.approx(sum(exact) / 3, abs=1e-4)
    assert all(0 <= e["exact"] <= 1 for e in card["heldout_eval"])
    assert card["episodes_seen"] == 48 and card["tokens"] > 0 and "machine" in card
    assert (adapter_dir / "README.md").read_text().startswith("# Δ-Mem adapter")
    st, pt = load_adapter(adapter_dir), load_adapter(adapter_dir / "delta_mem_adapter.pt")
    assert st.fingerprint == pt.fingerprint == card["adapter_fingerprint"]
    assert [p.name for p in sorted((tmp_path / "a").glob("checkpoint-*"))] == [
        "checkpoint-12", "checkpoint-18", "checkpoint-24", "checkpoint-6"]
    # a run stopped by its time budget after the first step, then resumed: the same adapter
    assert train(build_tiny_model("llama", seed=0), eps, tmp_path / "b", cfg, progress_bar=False, stop_after=0) is None
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-1"]
    resumed = train(build_tiny_model("llama", seed=0), eps, tmp_path / "b", cfg, progress_bar=False)
    assert load_adapter(resumed).fingerprint == st.fingerprint


def test_the_commands_make_data_and_train_an_adapter_the_server_loads(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from server.demo import build_demo_model

    repo = Path(__file__).resolve().parents[1]
    model_dir, _ = build_demo_model(tmp_path / "demo")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, cwd=repo,
                              env={**__import__("os").environ, "PYTHONPATH": str(repo)}, timeout=600)

    made = cli("make-data", "--out", str(tmp_path / "data"), "--train", "6", "--heldout", "3", "--min-gap", "2")
    assert made.returncode == 0, made.stderr
    held = [json.loads(line) for line in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 3 and all(r["gap"] >= 3 and r["split"] == "heldout" for r in held)
    run = cli("train", "--model", str(model_dir), "--data", str(tmp_path / "data" / "train.jsonl"), "--out",
              str(tmp_path / "run"), "--steps", "3", "--grad-accum", "1", "--save-every", "0", "--threads", "1",
              "--eval-data", str(tmp_path / "data" / "heldout.jsonl"), "--eval-n", "2", "--eval-every", "2",
              "--beta-bias-init", "-5", "--decorrelate-init", "2", "--alpha", "32", "--layers", "1")
    assert run.returncode == 0, run.stderr
    assert "held-out at step 2" in run.stderr and "held-out at step 3" in run.stderr
    adapter = tmp_path / "run" / "adapter"
    assert f"adapter: {adapter}" in run.stdout and "train" in run.stderr          # the progress bar
    dm = DeltaMemModel.from_pretrained(model_dir, adapter)
    assert dm.config.delta_heads == ("q", "o") and dm.config.beta_bias_init == -5 and dm.config.alpha == 32
    assert dm.config.target_layers == (1,) and len(dm.layers) == 1        # --layers: a memory in layer 1 only
    card = json.loads((adapter / "training_card.json").read_text())
    assert "--beta-bias-init -5" in card["command"] and card["command"] in (adapter / "README.md").read_text()
    assert dm.adapter_fingerprint == load_adapter(adapter).fingerprint
    # a second stage starts from the first one's adapter (its configuration comes along)
    stage2 = cli("train", "--model", str(model_dir), "--data", str(tmp_path / "data" / "train.jsonl"), "--out",
                 str(tmp_path / "run2"), "--steps", "1", "--grad-accum", "1", "--save-every", "0", "--threads", "1",
                 "--init-adapter", str(adapter), "--rank", "4")
    assert stage2.returncode == 0, stage2.stderr
    assert load_adapter(tmp_path / "run2" / "adapter").config == load_adapter(adapter).config
    # keep rows written by the backbone, then mixed into training with their held-out KL
    (tmp_path / "bench-prompts.txt").write_text("What is 2+2?\n")
    kept = cli("make-keep-data", "--model", str(model_dir), "--history", str(tmp_path / "data" / "train.jsonl"),
               "--out", str(tmp_path / "keep"), "--questions", "3", "--histories", "2", "--passages", "2",
               "--heldout", "1", "--max-tokens", "4", "--exclude", str(tmp_path / "bench-prompts.txt"), "--threads", "1")
    assert kept.returncode == 0, kept.stderr
    rows = [json.loads(line) for line in (tmp_path / "keep" / "train.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in rows) == ["keep-after-history"] * 3 + ["keep-alone"] * 3 + [
        "keep-own-turn"] * 2 + ["keep-text"] * 2
    alone = [r["messages"] for r in rows if r["kind"] == "keep-alone"]
    assert all(len(m) == 2 and m[0]["content"] != "What is 2+2?" for m in alone)
    after = [r["messages"] for r in rows if r["kind"] == "keep-after-history"]
    assert [m[-2:] for m in after] == alone and all(len(m) > 2 for m in after)   # the same turn after a history
    keep_run = cli("train", "--model", str(model_dir), "--data", str(tmp_path / "data" / "train.jsonl"), "--out",
                   str(tmp_path / "run4"), "--steps", "2", "--grad-accum", "2", "--save-every", "0", "--threads", "1",
                   "--keep-data", str(tmp_path / "keep" / "train.jsonl"), "--keep-weight", "2",
                   "--eval-keep-data", str(tmp_path / "keep" / "heldout.jsonl"),
                   "--eval-data", str(tmp_path / "data" / "heldout.jsonl"), "--eval-n", "2", "--layers", "1")
    assert keep_run.returncode == 0, keep_run.stderr
    assert "keep KL" in keep_run.stderr
    card = json.loads((tmp_path / "run4" / "adapter" / "training_card.json").read_text())
    assert card["episodes"] == 6 + 10 and card["train_config"]["keep_weight"] == 2 and "keep_kl" in card["heldout_eval"][-1]
    bad = cli("train", "--model", str(model_dir), "--data", str(tmp_path / "x.jsonl"), "--out", "r", "--layers", "a-b")
    assert bad.returncode == 2 and "--layers" in bad.stderr and "12-15,20" in bad.stderr
    beyond = cli("train", "--model", str(model_dir), "--data", str(tmp_path / "data" / "train.jsonl"), "--out",
                 str(tmp_path / "run3"), "--layers", "1-99")
    assert beyond.returncode == 2 and "--layers" in beyond.stderr and "Traceback" not in beyond.stderr
    missing = cli("train", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "x.jsonl"), "--out", "r")
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr and "Traceback" not in missing.stderr
