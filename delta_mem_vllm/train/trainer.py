"""The reference training recipe with a frozen backbone, on a CPU or a GPU.

Per episode: the state starts at zero, the write view is run with writes on and gradients flowing
back through the whole scan; the read view is run from the resulting state with writes off and no KV
cache of the history, so the answer can only come through the state; the loss is cross-entropy on
the answer plus `reg_weight × mean_layers(β̄ − reg_target)²` over the read view's write gates.
(The reference computes β̄ G times too large when a mask is present, its §1.10 quirk; here β̄ is the
true mean.) AdamW, cosine schedule with warmup, gradient accumulation, gradient clipping at 1.0.

Keep episodes (`Episode.keep`) add the keep objective, which the reference does not have: the read
view is written as served, and `keep_weight × KL(backbone ‖ memory)` over its labelled positions
pulls the memory's next-token distribution to the frozen backbone's own wherever the memory has
nothing to add. The teacher is the same model from a zero state with writes off (a zero state reads
nothing back, so that is exactly the bare backbone), one extra forward of the top layers per episode.

Checkpoints hold the adapter, optimiser, schedule, data position, RNG and loss history, so a resumed
run continues exactly where it stopped. The result is the adapter in both formats plus a card.
Held-out episodes, when given, are scored during training against the bare backbone (a zero state).
When every memory layer sits above layer 0, the frozen layers below the first are run once per
conversation and cached (`prefix.py`), checked once against the whole forward; `read_writes` makes
the read view write its question and answer, as a served turn does.
`decorrelate_init` optionally takes the backbone's shared input direction out of the fresh memory
projections (see `decorrelate_memory_projections`); the default is the reference initialisation.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..adapter import Adapter, save_adapter
from ..config import DeltaMemConfig
from ..hf.model import DeltaMemModel, find_attention_modules
from .episodes import IGNORE, Episode
from .prefix import Views, build_prefix

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 100
    grad_accum: int = 4                  # episodes per optimiser step
    lr: float = 2e-4
    warmup: float = 0.1                  # fraction of steps
    weight_decay: float = 0.0
    reg_weight: float = 0.01
    reg_target: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 50                 # steps between checkpoints (0: only at the end)
    eval_every: int = 50                 # steps between held-out evaluations (0: only at the end)
    autocast_bf16: bool = False          # backbone matmuls in bf16 (the Δ-Mem state stays fp32)
    decorrelate_init: int = 0            # write views used to take each layer's mean input direction out of
                                         # the fresh memory q/k/v projections (0: the reference init)
    read_writes: bool = False            # the read view writes too, as a served turn writes its question and
                                         # answer (the reference's read view is read-only)
    frozen_prefix: bool = True           # cache the layers below the first memory layer once (see prefix.py)
    keep_weight: float = 1.0             # weight of KL(backbone ‖ memory) on keep episodes


@dataclass
class _Progress:
    step: int = 0
    cursor: int = 0                      # episodes consumed
    losses: list[tuple] = field(default_factory=list)    # (step, loss, recall ce, keep kl); None: no such episode
    seconds: float = 0.0
    tokens: int = 0
    evals: list[dict[str, float]] = field(default_factory=list)      # held-out metrics by step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over ceil(warmup × steps), then cosine to 0 (the reference schedule)."""
    warm = max(1, math.ceil(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    done = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


class _AttentionInputs:
    """Captures each layer's attention input while `on`: the read pass's, for β̄ of the regulariser
    (and the write views', for the decorrelated init)."""

    def __init__(self, dm: DeltaMemModel) -> None:
        self.dm, self.inputs, self.on = dm, {}, False
        modules = dict(find_attention_modules(dm.model, dm.config))
        self._hooks = [modules[name].register_forward_pre_hook(self._capture(i), with_kwargs=True)
                       for i, name in enumerate(dm.layer_names)]

    def _capture(self, index: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if self.on:
                self.inputs[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()

    def penalty(self, target: float) -> torch.Tensor:
        """mean over layers of (β̄ − target)², β̄ the mean write gate over tokens and gate dims."""
        terms = []
        for i, layer in enumerate(self.dm.layers):
            x = self.inputs[i]
            beta = torch.sigmoid(F.linear(x.to(layer.beta_proj.dtype), layer.beta_proj, layer.beta_bias))
            terms.append((beta.mean() - target) ** 2)
        self.inputs.clear()
        return torch.stack(terms).mean()


class EpisodeRunner:
    """Runs an episode's write and read views, from the cached frozen prefix when there is one."""

    def __init__(self, dm: DeltaMemModel, prefix: Sequence[Views] | None = None, layer: int = 0) -> None:
        self.dm, self.prefix, self.layer = dm, prefix, layer

    def write(self, i: int, ep: Episode, write: bool = True) -> torch.Tensor | None:
        """The state after the history (None when there is none)."""
        if not ep.write_ids:
            return None
        if self.prefix is not None:
            return self.dm.forward_from(self.prefix[i][0][None], self.layer, write=write, logits_to_keep=1).state
        return self.dm(torch.tensor([ep.write_ids], device=self.dm.device), write=write, logits_to_keep=1).state

    def read(self, i: int, ep: Episode, state: torch.Tensor | None, keep: int, write: bool = False) -> torch.Tensor:
        """The read view's last `keep` logits, from `state`."""
        if self.prefix is not None:
            return self.dm.forward_from(self.prefix[i][1][None], self.layer, state=state, write=write,
                                        logits_to_keep=keep).logits
        return self.dm(torch.tensor([ep.read_ids], device=self.dm.device), state=state, write=write,
                       logits_to_keep=keep).logits


def _answer_targets(ep: Episode, device: torch.device) -> tuple[torch.Tensor, int]:
    """The read view's labels from the first scored token on, and how many final logits score them
    (positions first-1 … end: each predicts the next token)."""
    first = next(i for i, t in enumerate(ep.labels) if t != IGNORE)
    return torch.tensor(ep.labels[first:], device=device), len(ep.read_ids) - first + 1


def kl_to_backbone(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ model), both given as logits [N, V]."""
    target = F.log_softmax(teacher.float(), -1)
    return (target.exp() * (target - F.log_softmax(logits.float(), -1))).sum(-1).mean()


def episode_loss(run: EpisodeRunner, i: int, ep: Episode, gates: _AttentionInputs,
                 cfg: TrainConfig) -> tuple[torch.Tensor, float]:
    """Loss of episode `i`, and its answer cross-entropy (recall) or KL to the backbone (keep). Only
    the logits that are scored are computed: none for the write view, the labelled positions for the
    read view (the vocabulary projection is a large share of the work)."""
    device = run.dm.device
    targets, keep = _answer_targets(ep, device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.autocast_bf16 else torch.autocast(
        device.type, enabled=False)
    with ctx:
        state = run.write(i, ep)
        gates.on = True
        try:
            logits = run.read(i, ep, state, keep, write=cfg.read_writes or ep.keep)
        finally:
            gates.on = False
        if ep.keep:
            with torch.no_grad():
                teacher = run.read(i, ep, None, keep, write=False)
    if ep.keep:
        term = kl_to_backbone(logits[0, :-1], teacher[0, :-1])
        base = cfg.keep_weight * term
    else:
        term = base = F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=IGNORE)
    loss = base + cfg.reg_weight * gates.penalty(cfg.reg_target) if cfg.reg_weight else base
    return loss, float(term.detach())


@torch.no_grad()
def evaluate(dm: DeltaMemModel | EpisodeRunner, episodes: Sequence[Episode], memory: bool = True,
             read_writes: bool = False) -> dict[str, float]:
    """Held-out answer cross-entropy, teacher-forced answer-token accuracy and whole-answer exact
    match (every answer token the top choice: the fact's value included, which token accuracy hides
    behind the answer's easy form words), the answer read from the state the history wrote (`memory`)
    or from a zero state (the bare backbone: zero reads add nothing), so the gap between the two is
    what the memory carries."""
    run = dm if isinstance(dm, EpisodeRunner) else EpisodeRunner(dm)
    nll = correct = count = exact = answers = 0.0
    for i, ep in enumerate(episodes):
        if ep.keep:
            continue
        answers += 1
        targets, keep = _answer_targets(ep, run.dm.device)
        state = run.write(i, ep) if memory else None
        logits = run.read(i, ep, state, keep, write=read_writes)[0, :-1].float()
        scored = targets != IGNORE
        nll += float(F.cross_entropy(logits[scored], targets[scored], reduction="sum"))
        hits = logits.argmax(-1)[scored] == targets[scored]
        correct += float(hits.sum())
        exact += float(hits.all())
        count += int(scored.sum())
    return {"ce": round(nll / max(1, count), 4), "token_accuracy": round(correct / max(1, count), 4),
            "exact": round(exact / max(1, answers), 4)}


@torch.no_grad()
def evaluate_keep(run: EpisodeRunner, episodes: Sequence[Episode]) -> float:
    """Mean KL(backbone ‖ memory) over the keep episodes among `episodes`: 0 when the memory changes nothing."""
    total = count = 0.0
    for i, ep in enumerate(episodes):
        if not ep.keep:
            continue
        count += 1
        _, keep = _answer_targets(ep, run.dm.device)
        logits = run.read(i, ep, run.write(i, ep), keep, write=True)[0, :-1]
        total += float(kl_to_backbone(logits, run.read(i, ep, None, keep, write=False)[0, :-1]))
    return round(total / max(1, count), 5)


@torch.no_grad()
def decorrelate_memory_projections(dm: DeltaMemModel | EpisodeRunner, episodes: Sequence[Episode]) -> None:
    """Remove each layer's mean attention-input direction from the memory q/k/v projections.

    A backbone's attention inputs share a large constant component (massive activations): on
    SmolLM2 the memory values and keys of any two tokens have cosine 0.9–0.99 from layer 3 on, so
    every token writes nearly the same thing under nearly the same key and the state cannot tell a
    fact from small talk. Projecting the mean direction out (W ← W(I − μ̂μ̂ᵀ), μ̂ estimated on these
    write views) leaves cosines near 0 at the start of training."""
    run = dm if isinstance(dm, EpisodeRunner) else EpisodeRunner(dm)
    dm = run.dm
    capture = _AttentionInputs(dm)
    capture.on = True
    sums = [torch.zeros((), device=dm.device) for _ in dm.layers]
    try:
        for j, ep in enumerate(episodes):
            run.write(j, ep, write=False)
            for i, x in capture.inputs.items():
                sums[i] = sums[i] + x.float().flatten(0, -2).sum(0)
            capture.inputs.clear()
    finally:
        capture.close()
    for i, layer in enumerate(dm.layers):
        mu = F.normalize(sums[i], dim=0)      # the direction of the mean: the token count drops out
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            weight = getattr(layer, name)
            weight.sub_(torch.outer(weight.float() @ mu, mu).to(weight.dtype))


def _runners(dm: DeltaMemModel, episodes: Sequence[Episode], eval_episodes: Sequence[Episode], out: Path,
             cfg: TrainConfig, progress_bar: bool) -> tuple[EpisodeRunner, EpisodeRunner]:
    """Runners for the training and held-out episodes: on the cached frozen prefix when every memory
    layer is above layer 0 and the cached path reproduces the full forward on the first episode."""
    layer = dm.first_memory_layer if cfg.frozen_prefix and all(i is not None for i in dm.layer_indices) else 0
    if layer == 0 or cfg.autocast_bf16:
        return EpisodeRunner(dm), EpisodeRunner(dm)
    try:
        probe = EpisodeRunner(dm, build_prefix(dm, episodes[:1], layer, progress_bar=False), layer)
        ep = episodes[0]
        with torch.no_grad():
            state = EpisodeRunner(dm).write(0, ep)
            cached = probe.read(0, ep, probe.write(0, ep), 4)
            full = EpisodeRunner(dm).read(0, ep, state, 4)
        if not torch.allclose(cached, full, atol=1e-3, rtol=1e-3):
            raise ValueError(f"logits differ by {float((cached - full).abs().max()):.2e}")
    except (TypeError, ValueError, NotImplementedError) as exc:
        log.warning("training through the whole backbone: the frozen-prefix path does not apply (%s)", exc)
        return EpisodeRunner(dm), EpisodeRunner(dm)
    log.info("memory from decoder layer %d: layers 0-%d are run once per conversation and cached", layer, layer - 1)
    run = EpisodeRunner(dm, build_prefix(dm, episodes, layer, out / "frozen-prefix.pt", "frozen prefix",
                                         progress_bar), layer)
    held = EpisodeRunner(dm, build_prefix(dm, eval_episodes, layer, out / "frozen-prefix-eval.pt",
                                          "frozen prefix, held-out", progress_bar), layer) if eval_episodes else run
    return run, held


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out: Path, dm: DeltaMemModel, opt: torch.optim.Optimizer, prog: _Progress,
                     cfg: TrainConfig) -> Path:
    final = out / f"checkpoint-{prog.step}"
    tmp = out / f".checkpoint-{prog.step}.partial"
    save_adapter(dm.adapter(), tmp / "adapter")
    torch.save({"optimizer": opt.state_dict(), "progress": asdict(prog), "config": asdict(cfg),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    tmp.rename(final)
    return final


def train(model: torch.nn.Module, episodes: Sequence[Episode], out: Path, cfg: TrainConfig,
          adapter_config: DeltaMemConfig | Adapter | None = None, data_note: str = "",
          progress_bar: bool = True, stop_after: float | None = None,
          eval_episodes: Sequence[Episode] = (), command: str = "") -> Path | None:
    """Train a Δ-Mem adapter on `episodes` for `cfg.steps` optimiser steps (resuming from the latest
    checkpoint in `out`); returns the directory of the final adapter. `stop_after` (seconds of this
    run) ends the run early with a checkpoint to resume from, and returns None. `eval_episodes` are
    scored every `cfg.eval_every` steps and at the end (memory vs zero state, logged and carded)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    dm = DeltaMemModel(model, adapter_config or DeltaMemConfig())
    dm.eval()        # no dropout anywhere: the backbone is frozen and Δ-Mem has none
    params = [p for p in dm.layers.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order: list[int] = []
    prog = _Progress()
    previous = _checkpoints(out)
    if previous:
        from ..adapter import load_adapter

        saved = torch.load(previous[-1] / "trainer.pt", weights_only=True)   # tensors and plain values only
        dm.load_adapter_weights(load_adapter(previous[-1] / "adapter"))
        opt.load_state_dict(saved["optimizer"])
        prog = _Progress(**{**saved["progress"], "losses": [tuple(x) for x in saved["progress"]["losses"]]})
        torch.set_rng_state(saved["torch_rng"])
        log.info("resuming from %s (step %d of %d)", previous[-1].name, prog.step, cfg.steps)
    run, eval_run = _runners(dm, episodes, eval_episodes, out, cfg, progress_bar)
    if not previous and cfg.decorrelate_init and not isinstance(adapter_config, Adapter):
        decorrelate_memory_projections(run, episodes[:cfg.decorrelate_init])
        log.info("memory projections decorrelated from the mean input on %d write views",
                 min(len(episodes), cfg.decorrelate_init))

    def next_episode() -> tuple[int, Episode]:
        nonlocal order
        if not order:           # a fresh shuffled pass over the data
            order = list(range(len(episodes)))
            random.Random(f"{cfg.seed}:{prog.cursor // len(episodes)}").shuffle(order)
            order = order[prog.cursor % len(episodes):]
        prog.cursor += 1
        i = order.pop(0)
        return i, episodes[i]

    baseline = evaluate(eval_run, eval_episodes, memory=False, read_writes=cfg.read_writes) if eval_episodes else None

    def run_eval() -> None:
        if not eval_episodes or (prog.evals and prog.evals[-1]["step"] == prog.step):
            return
        t0 = time.perf_counter()
        metrics = {"step": prog.step, **evaluate(eval_run, eval_episodes, read_writes=cfg.read_writes)}
        if any(ep.keep for ep in eval_episodes):
            metrics["keep_kl"] = evaluate_keep(eval_run, eval_episodes)
        prog.evals.append(metrics)
        log.info("held-out at step %d: answer ce %.3f, token accuracy %.3f, exact %.3f (zero state: %.3f, %.3f, "
                 "%.3f)%s [%.0f s]", prog.step, metrics["ce"], metrics["token_accuracy"], metrics["exact"],
                 baseline["ce"], baseline["token_accuracy"], baseline["exact"],
                 f", keep KL {metrics['keep_kl']:.4f}" if "keep_kl" in metrics else "", time.perf_counter() - t0)

    gates = _AttentionInputs(dm)
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=prog.step, desc="train", unit="step", disable=not progress_bar)
    try:
        while prog.step < cfg.steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(prog.step, cfg)
            total = 0.0
            terms: dict[bool, list[float]] = {False: [], True: []}      # recall ce, keep kl
            tokens = 0
            for _ in range(cfg.grad_accum):
                i, ep = next_episode()
                loss, term = episode_loss(run, i, ep, gates, cfg)
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
                terms[ep.keep].append(term)
                tokens += ep.tokens
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            prog.step += 1
            dt = time.perf_counter() - t0
            prog.seconds += dt
            prog.tokens += tokens
            ce, kl = (round(sum(t) / len(t), 5) if t else None for t in (terms[False], terms[True]))
            prog.losses.append((prog.step, round(total, 5), ce, kl))
            shown = {"loss": f"{total:.3f}", **({"ce": f"{ce:.3f}"} if ce is not None else {}),
                     **({"kl": f"{kl:.4f}"} if kl is not None else {}), "tok_s": f"{tokens / dt:.0f}"}
            bar.set_postfix(shown, refresh=False)
            bar.update(1)
            if not progress_bar and (prog.step % 10 == 0 or prog.step == cfg.steps):
                log.info("step %d/%d %s", prog.step, cfg.steps, " ".join(f"{k} {v}" for k, v in shown.items()))
            if cfg.eval_every and prog.step % cfg.eval_every == 0 and prog.step < cfg.steps:
                run_eval()
            if cfg.save_every and prog.step % cfg.save_every == 0 and prog.step < cfg.steps:
                _save_checkpoint(out, dm, opt, prog, cfg)
            if stop_after is not None and time.perf_counter() - started >= stop_after and prog.step < cfg.steps:
                if not (out / f"checkpoint-{prog.step}").exists():
                    _save_checkpoint(out, dm, opt, prog, cfg)
                log.info("time budget spent at step %d of %d: resume with the same command", prog.step, cfg.steps)
                return None
    finally:
        bar.close()
        gates.close()
    run_eval()
    final = _save_checkpoint(out, dm, opt, prog, cfg) if not (out / f"checkpoint-{prog.step}").exists() \
        else out / f"checkpoint-{prog.step}"
    adapter_dir = out / "adapter"
    adapter = dm.adapter()
    save_adapter(adapter, adapter_dir, formats=("safetensors", "pt"))
    _write_card(adapter_dir, model, dm, adapter.fingerprint, cfg, prog, data_note, len(episodes), final, baseline,
                command)
    return adapter_dir


def _write_card(adapter_dir: Path, model: torch.nn.Module, dm: DeltaMemModel, fingerprint: str, cfg: TrainConfig,
                prog: _Progress, data_note: str, n_episodes: int, checkpoint: Path,
                baseline: dict[str, float] | None, command: str) -> None:
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if dm.device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(dm.device)}"
    card = {"backbone": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "adapter_fingerprint": fingerprint, "data": data_note, "episodes": n_episodes,
            "episodes_seen": prog.cursor, "steps": prog.step, "train_config": asdict(cfg),
            "seconds": round(prog.seconds, 1), "tokens": prog.tokens,
            "tokens_per_second": round(prog.tokens / prog.seconds, 1) if prog.seconds else None,
            "machine": machine, "loss_curve": prog.losses, "heldout_eval": prog.evals,
            "heldout_zero_state": baseline, "checkpoint": checkpoint.name, "command": command}
    (adapter_dir / "training_card.json").write_text(json.dumps(card, indent=1) + "\n")
    ces = [x[2] for x in prog.losses if x[2] is not None]
    first, last = (sum(part) / max(1, len(part)) for part in (ces[:10], ces[-10:]))
    (adapter_dir / "README.md").write_text(
        f"# Δ-Mem adapter for {card['backbone']}\n\n"
        f"- data: {data_note} ({n_episodes} episodes, {prog.cursor} seen)\n"
        f"- steps: {prog.step} × {cfg.grad_accum} episodes, lr {cfg.lr}, seed {cfg.seed}\n"
        f"- answer cross-entropy: {first:.3f} (first 10 steps) → {last:.3f} (last 10 steps)\n"
        f"- time: {prog.seconds / 60:.1f} min, {card['tokens_per_second']} tokens/s on {machine}\n"
        + (f"- held-out answer: cross-entropy {prog.evals[-1]['ce']:.3f}, token accuracy "
           f"{prog.evals[-1]['token_accuracy']:.3f}, exact answers {prog.evals[-1]['exact']:.3f} (zero state, i.e. "
           f"the bare backbone: {baseline['ce']:.3f}, {baseline['token_accuracy']:.3f}, {baseline['exact']:.3f})\n"
           if prog.evals and baseline else "")
        + f"- adapter fingerprint: {fingerprint}\n\n"
        + (f"Trained with:\n\n    {command}\n\n" if command else "")
        + "The loss curve and the full settings are in training_card.json.\n")
