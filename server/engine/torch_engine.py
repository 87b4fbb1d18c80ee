"""TorchEngine: the embedded engine (transformers model + Δ-Mem via DeltaMemModel), CPU or GPU.

One worker thread owns the model. It round-robins over the active requests, giving each one step
per round: a prefill chunk of at most `prefill_chunk` tokens, or one decode token — the decode tokens
of all requests run as one batched forward. So streams interleave and a long prompt or generation
never blocks the others. Each request carries its own state tensor and KV cache (DeltaMemModel is
functional in the state, and every batch row has its own state, write permission and padding mask),
so requests cannot see each other's memory. Results go back to per-request asyncio queues through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from server.engine.base import EngineError, GenerationOutput, GenerationRequest, RequestRejected, TokenLogprob
from server.engine.detok import IncrementalDetokenizer
from server.engine.grammar import Constraint, GrammarCompiler, GrammarError
from server.engine.hardware import resolve_dtype
from server.engine.model_info import config_fingerprint, default_model_name, eos_token_ids, load_tokenizer
from server.engine.sampling import make_generator, prompt_mask, sample_next, token_logprob

log = logging.getLogger("deltamem.engine")


@dataclass(eq=False)
class _Active:
    """A request inside the worker. Only the worker thread touches the tensors."""

    req: GenerationRequest
    push: Callable[[GenerationOutput], None]
    state: torch.Tensor                      # [1, L, h, R, R] fp32
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    max_tokens: int
    in_prompt: torch.Tensor | None = None    # prompt ids as a vocabulary mask (repetition penalty)
    constraint: Constraint | None = None     # the grammar of a structured output
    stop_ids: tuple[int, ...] = ()           # EOS (unless ignored) and the request's stop ids
    cache: Any = None
    pos: int = 0                             # prompt tokens processed
    generated: list[int] = field(default_factory=list)
    to_feed: int | None = None               # last sampled token, fed on the next step
    aborted: bool = False

    @property
    def write_start(self) -> int:
        return self.req.memory.write_start


class TorchEngine:
    """Engine protocol implementation over a DeltaMemModel (see server/engine/base.py)."""

    def __init__(self, dm: Any, tokenizer: Any, *, model_name: str, max_model_len: int | None = None,
                 prefill_chunk: int = 256, model_fingerprint: str | None = None) -> None:
        self.dm = dm
        self.tokenizer = tokenizer
        self.model_name = model_name
        cfg = dm.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 1 << 30
        self.max_model_len = min(max_model_len, limit) if max_model_len else limit
        self.prefill_chunk = prefill_chunk
        self.state_shape = tuple(dm.state_shape)
        self.layer_names = list(dm.layer_names)
        self.adapter_fingerprint = dm.adapter_fingerprint
        self.model_fingerprint = model_fingerprint if model_fingerprint is not None else config_fingerprint(cfg)
        self.device = dm.device
        self.eos_token_ids = eos_token_ids(getattr(dm.model, "generation_config", None), cfg, tokenizer)
        self.write_granularity = dm.config.memory_write_granularity
        # only the last position's logits are sampled: skip the [T, vocab] projection of a prefill chunk
        self._keep_last = 1 if dm.supports_logits_to_keep else 0
        # ids >= len(tokenizer) are padding rows of the embedding: never sample them
        self.valid_vocab = len(tokenizer)
        self.logits_size = dm.model.get_output_embeddings().weight.shape[0]
        self.grammars = GrammarCompiler(tokenizer, self.logits_size)
        self._incoming: deque[_Active] = deque()
        self._active: list[_Active] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batched_decode_steps = 0            # decode rounds that ran as one batched forward

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Any) -> "TorchEngine":
        from delta_mem_vllm.hf import DeltaMemModel

        if not settings.model or not settings.adapter:
            raise EngineError("the torch engine needs --model and --adapter (or --demo)")
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, resolve_dtype(settings.dtype, device))
        if settings.dtype == "auto":
            log.info("dtype auto: %s on %s", str(dtype).removeprefix("torch."), device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        dm = DeltaMemModel.from_pretrained(settings.model, settings.adapter, dtype=dtype, device=device,
                                           attn_implementation=settings.attn_implementation)
        tokenizer = load_tokenizer(settings)
        name = settings.served_model_name or default_model_name(settings.model)
        return cls(dm, tokenizer, model_name=name, max_model_len=settings.max_model_len,
                   prefill_chunk=settings.prefill_chunk)

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="deltamem-torch-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 30.0)

    def health(self) -> dict[str, Any]:
        with self._cond:
            active = len(self._active) + len(self._incoming)
        return {"worker_alive": self._thread is not None and self._thread.is_alive(), "active_requests": active,
                "batched_decode_steps": self.batched_decode_steps}

    # --- states ---------------------------------------------------------------------------------
    def zero_state(self) -> torch.Tensor:
        return self.dm.zero_state()

    async def import_state(self, state: torch.Tensor) -> torch.Tensor:
        if tuple(state.shape) != self.state_shape:
            raise ValueError(f"state has shape {tuple(state.shape)}, the engine expects {self.state_shape}")
        if state.dtype != torch.float32:
            raise ValueError(f"state must be float32, got {state.dtype}")
        return state.detach().to(self.device, copy=True)

    async def export_state(self, state: torch.Tensor) -> torch.Tensor:
        return state.detach().to("cpu", torch.float32, copy=True)

    # --- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._thread is None or self._stopping:
            raise EngineError("engine is not running")
        prompt = request.prompt_token_ids
        if not prompt:
            raise EngineError("empty prompt")
        if not 0 <= request.memory.write_start <= len(prompt):
            raise EngineError(f"write_start {request.memory.write_start} outside the prompt (length {len(prompt)})")
        if self.write_granularity != "token":
            ids = (request.memory.message_ids, request.memory.sentence_ids)
            if any(i is None or len(i) != len(prompt) for i in ids):
                raise EngineError(f"a {self.write_granularity} adapter needs message and sentence ids for "
                                  "every prompt token")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()

        def push(item: GenerationOutput) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody listens any more
                pass

        sp = request.sampling
        stop_ids = sp.stop_token_ids if sp.ignore_eos else self.eos_token_ids + sp.stop_token_ids
        constraint = None
        if sp.structured is not None:
            try:
                constraint = await asyncio.to_thread(self.grammars.constraint, sp.structured, stop_ids)
            except GrammarError as exc:
                raise RequestRejected(str(exc), param="response_format") from None
        init = request.memory.initial_state
        state = (self.dm.zero_state(1) if init is None
                 else init.detach().to(self.device, torch.float32).reshape(1, *self.state_shape))
        room = self.max_model_len - len(prompt)
        act = _Active(req=request, push=push, state=state,
                      detok=IncrementalDetokenizer(self.tokenizer, request.sampling.stop,
                                                   min_tokens=request.sampling.min_tokens),
                      generator=make_generator(request.sampling, self.device),
                      max_tokens=max(0, min(request.sampling.max_tokens, room)),
                      in_prompt=prompt_mask(request.sampling, prompt, self.logits_size, self.device),
                      constraint=constraint, stop_ids=stop_ids)
        with self._cond:
            self._incoming.append(act)
            self._cond.notify()
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:
                act.aborted = True

    # --- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._incoming and not self._active:
                    self._cond.wait()
                if self._stopping:
                    doomed = self._active + list(self._incoming)
                    self._active, self._incoming = [], deque()
                    break
                while self._incoming:
                    self._active.append(self._incoming.popleft())
            finished = [act for act in self._active if act.aborted]
            decoding = [act for act in self._active if not act.aborted and act.pos >= len(act.req.prompt_token_ids)]
            for act in self._active:   # one prefill chunk per prefilling request …
                if not act.aborted and act not in decoding and self._guarded(act, self._prefill_step):
                    finished.append(act)
            if decoding:               # … and one token for every decoding request, as one batch
                finished += self._decode_round(decoding)
            for act in finished:
                act.cache = None
                with self._cond:
                    self._active.remove(act)
        for act in doomed:
            act.push(GenerationOutput(act.req.request_id, [], "", finished=True, finish_reason="abort",
                                      error="engine stopped"))

    def _guarded(self, act: _Active, step: Callable[[_Active], bool]) -> bool:
        """Run one step of one request; a failure ends that request only. True when it is finished."""
        try:
            with torch.inference_mode():
                return step(act)
        except Exception as exc:  # noqa: BLE001 - report to the request, keep serving others
            log.exception("request %s failed", act.req.request_id)
            act.push(GenerationOutput(act.req.request_id, [], "", finished=True, finish_reason="error",
                                      error=f"{type(exc).__name__}: {exc}"))
            return True

    def _prefill_step(self, act: _Active) -> bool:
        """One prefill chunk; the last one samples the first token."""
        prompt = act.req.prompt_token_ids
        # Segment means depend on call boundaries, so a segment adapter's prompt
        # is one call, as in the reference runtime; token writes are chunking-invariant.
        size = self.prefill_chunk if self.write_granularity == "token" else len(prompt)
        span = slice(act.pos, act.pos + size)
        ws = min(max(act.write_start - act.pos, 0), len(prompt[span]))
        segments = None
        if self.write_granularity != "token":
            segments = (act.req.memory.message_ids[span], act.req.memory.sentence_ids[span])
        logits = self._forward(act, prompt[span], ws, act.req.memory.write, segments)
        act.pos += len(prompt[span])
        return act.pos >= len(prompt) and self._on_logits(act, logits)

    def _decode_step(self, act: _Active) -> bool:
        # a generated token is its own call: a one-token segment, i.e. a token write
        segments = None if self.write_granularity == "token" else ((0,), (0,))
        return self._on_logits(act, self._forward(act, [act.to_feed], 0, act.req.memory.write, segments))

    def _decode_round(self, acts: list[_Active]) -> list[_Active]:
        """Feed every decoding request its last token in one batched forward; returns the finished.

        Each request keeps its own state and KV cache between rounds: the batch is assembled per step
        (caches left-padded to a common length, masked out), so requests join and leave freely and
        a row's result does not depend on its neighbours. Falls back to one call per request where
        batching does not apply (a single request, sliding-window caches) or a batched call fails.
        """
        if len(acts) > 1 and self._batchable(acts):
            try:
                with torch.inference_mode():
                    logits = self._batched_forward(acts)
            except Exception:  # noqa: BLE001 - retry one by one so only a broken request fails
                log.exception("batched decode step failed; retrying per request")
            else:
                return [act for act, row in zip(acts, logits) if self._guarded(act, lambda a, r=row: self._on_logits(a, r))]
        return [act for act in acts if self._guarded(act, self._decode_step)]

    @staticmethod
    def _batchable(acts: list[_Active]) -> bool:
        return all(act.cache is not None and not any(getattr(layer, "is_sliding", False) for layer in act.cache.layers)
                   for act in acts)

    def _batched_forward(self, acts: list[_Active]) -> list[torch.Tensor]:
        from transformers import DynamicCache

        lengths = [act.cache.get_seq_length() for act in acts]
        longest = max(lengths)
        pad = lambda t, n: torch.nn.functional.pad(t, (0, 0, n, 0))  # noqa: E731  (left, on the sequence axis)
        layers = []
        for per_request in zip(*(act.cache.layers for act in acts)):
            layers.append((torch.cat([pad(layer.keys, longest - n) for layer, n in zip(per_request, lengths)]),
                           torch.cat([pad(layer.values, longest - n) for layer, n in zip(per_request, lengths)])))
        mask = torch.zeros(len(acts), longest + 1, dtype=torch.long, device=self.device)
        for row, n in enumerate(lengths):
            mask[row, longest - n:] = 1
        # a read-only request writes nothing: its one token this step is a read-only prefix
        write_start = torch.tensor([0 if act.req.memory.write else 1 for act in acts], device=self.device)
        seg_kwargs = {}
        if self.write_granularity != "token":
            zeros = torch.zeros(len(acts), 1, dtype=torch.long, device=self.device)
            seg_kwargs = {"message_ids": zeros, "sentence_ids": zeros}
        out = self.dm(torch.tensor([[act.to_feed] for act in acts], device=self.device), attention_mask=mask,
                      state=torch.cat([act.state for act in acts]), write_start=write_start,
                      past_key_values=DynamicCache(ddp_cache_data=layers), use_cache=True,
                      logits_to_keep=self._keep_last, **seg_kwargs)
        self.batched_decode_steps += 1
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        for row, (act, n) in enumerate(zip(acts, lengths)):
            act.state = out.state[row:row + 1]
            keep = slice(longest - n, None)
            act.cache = DynamicCache(ddp_cache_data=[(k[row:row + 1, :, keep], v[row:row + 1, :, keep]) for k, v in kv])
        return list(out.logits[:, -1])

    def _forward(self, act: _Active, ids: list[int], write_start: int, write: bool,
                 segments: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        seg_kwargs = {}
        if segments is not None:
            seg_kwargs = {name: torch.tensor([list(v)], dtype=torch.long, device=self.device)
                          for name, v in zip(("message_ids", "sentence_ids"), segments)}
        out = self.dm(input_ids, state=act.state, write_start=write_start, write=write,
                      past_key_values=act.cache, use_cache=True, logits_to_keep=self._keep_last, **seg_kwargs)
        act.state = out.state
        act.cache = out.past_key_values
        return out.logits[0, -1]

    def _on_logits(self, act: _Active, logits: torch.Tensor) -> bool:
        sp = act.req.sampling
        if act.max_tokens == 0:  # prompt fills the context: nothing may be generated
            return self._finish(act, "length", [], "")
        stop_ids = act.stop_ids
        if act.constraint is not None:
            logits = act.constraint.mask(logits)
        tok = sample_next(logits, sp, act.generator, self.valid_vocab, in_prompt=act.in_prompt, output=act.generated,
                          stop_ids=stop_ids)
        if act.constraint is not None:
            act.constraint.accept(tok)
        logprobs = None if sp.logprobs is None else [token_logprob(logits, tok, sp.logprobs, self.valid_vocab)]
        act.generated.append(tok)
        text = act.detok.add(tok)
        reason = None
        if len(act.generated) > sp.min_tokens and tok in stop_ids or act.detok.stopped:
            reason = "stop"
        elif len(act.generated) >= act.max_tokens:
            reason = "length"
        if reason is not None:
            return self._finish(act, reason, [tok], text, logprobs)
        act.to_feed = tok
        act.push(GenerationOutput(act.req.request_id, [tok], text, logprobs, completion_tokens=len(act.generated)))
        return False

    def _finish(self, act: _Active, reason: str, new_ids: list[int], text: str,
                logprobs: list[TokenLogprob] | None = None) -> bool:
        text += act.detok.flush()
        prompt = act.req.prompt_token_ids
        fed = act.generated[:-1]  # the last sampled token was never processed
        written = (prompt[act.write_start:] + fed) if act.req.memory.write else []
        act.push(GenerationOutput(
            act.req.request_id, new_ids, text, logprobs, finished=True, finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(prompt), completion_tokens=len(act.generated),
            final_state=act.state[0], written_token_ids=written, pending_token_ids=act.generated[-1:],
        ))
        return True

