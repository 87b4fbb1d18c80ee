"""VllmEngine: the engine protocol on vLLM's AsyncLLM with the delta_mem_vllm plugin.

The server renders and splits prompts as for any engine; this class only runs tokens. A request's
initial state and write start travel with it (`kv_transfer_params`, see delta_mem_vllm.vllm.protocol);
vLLM batches every session's requests together, each in its own state slot. When a request that
needs its state back finishes, the plugin copies its slot into the worker's outbox in the next
engine step, and `StateCollector` fetches it with one `collective_rpc` for all requests finishing
around the same time. The written/pending split comes from the number of tokens the engine reports
the state covers, never from a guess about vLLM's scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

import torch

from server.engine.base import (EngineError, GenerationOutput, GenerationRequest, RequestRejected, SamplingParams,
                                StructuredOutput, TokenLogprob)
from server.engine.detok import IncrementalDetokenizer
from server.engine.model_info import config_fingerprint, default_model_name, eos_token_ids, load_tokenizer

log = logging.getLogger("deltamem.engine")

STATE_TIMEOUT = 60.0   # seconds to wait for a finished request's state before failing the turn
DISCARD_TIMEOUT = 10.0  # seconds to look for the state of an aborted request (to drop it) before giving up


class EngineStopped(EngineError):
    """The engine is stopped: the request never reached vLLM."""


class StateCollector:
    """Fetches finished requests' states from the workers, batching concurrent requests into one RPC.

    A state is saved in the engine step after its request finished, so a key may not be there yet:
    it is asked for again (with a short, growing pause) until it arrives or its deadline passes.
    Keys of requests nobody will read (aborted) are fetched and thrown away so they do not linger.
    """

    def __init__(self, rpc: Any, timeout: float = STATE_TIMEOUT) -> None:
        self._rpc = rpc
        self._timeout = timeout
        self._waiting: dict[str, tuple[asyncio.Future | None, float]] = {}
        self._task: asyncio.Task | None = None
        self.rpcs = 0

    async def take(self, key: str) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self._add(key, future)
        return await future

    def discard(self, key: str) -> None:
        """Forget a key's state when it arrives (an aborted request's; it may never have been saved)."""
        self._add(key, None, timeout=min(self._timeout, DISCARD_TIMEOUT))

    def _add(self, key: str, future: asyncio.Future | None, timeout: float | None = None) -> None:
        self._waiting[key] = (future, time.monotonic() + (timeout or self._timeout))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        pause = 0.0
        while self._waiting:
            keys = list(self._waiting)
            try:
                self.rpcs += 1
                found = (await self._rpc("deltamem_take", args=(keys,)))[0]
            except Exception as exc:  # noqa: BLE001 - the engine is gone: fail everyone waiting
                for future, _ in self._waiting.values():
                    if future is not None and not future.done():
                        future.set_exception(EngineError(f"could not fetch the final state: {exc}"))
                self._waiting.clear()
                return
            now = time.monotonic()
            for key in keys:
                future, deadline = self._waiting[key]
                if key in found:
                    del self._waiting[key]
                    if future is not None and not future.done():
                        future.set_result(found[key])
                elif now > deadline:
                    del self._waiting[key]
                    if future is not None and not future.done():
                        future.set_exception(EngineError(f"the engine did not hand over the final state of {key} "
                                                         f"within {self._timeout:.0f} s"))
            pause = 0.0 if found else pause   # states arrive in bursts: after a hit, ask again at once
            if self._waiting:
                await asyncio.sleep(pause)
                pause = min(0.05, 2 * pause + 0.001)


class VllmEngine:
    """Engine protocol implementation over vLLM (see server/engine/base.py)."""

    write_granularity = "token"

    def __init__(self, llm: Any, tokenizer: Any, *, model_name: str, max_model_len: int,
                 layer_names: list[str], state_shape: tuple[int, int, int, int], adapter_fingerprint: str,
                 model_fingerprint: str, eos_token_ids: tuple[int, ...]) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.layer_names = layer_names
        self.state_shape = state_shape
        self.adapter_fingerprint = adapter_fingerprint
        self.model_fingerprint = model_fingerprint
        self.eos_token_ids = eos_token_ids
        self.device = torch.device("cpu")   # states live with the server; each request carries its own
        self.states = StateCollector(self._rpc)
        self._active: set[str] = set()
        self._stopping = False
        self.stop_replays = 0   # stop-string turns whose state was recomputed (vLLM had run past the stop)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Any) -> "VllmEngine":
        from transformers import AutoConfig, GenerationConfig
        from vllm.config import StructuredOutputsConfig

        from delta_mem_vllm.adapter import load_adapter
        from delta_mem_vllm.vllm.compat import installed_version
        from delta_mem_vllm.vllm.launch import engine_kwargs

        installed_version()
        if not settings.model or not settings.adapter:
            raise EngineError("the vLLM engine needs --model and --adapter (or --demo)")
        adapter = load_adapter(settings.adapter)
        tokenizer = load_tokenizer(settings)
        hf_config = AutoConfig.from_pretrained(settings.model)
        try:
            generation_config = GenerationConfig.from_pretrained(settings.model)
        except OSError:
            generation_config = None
        engine = engine_kwargs(settings.model, settings.adapter, valid_vocab=len(tokenizer),
                               **vllm_engine_settings(settings))
        # structured outputs exactly as the embedded engine decodes them (server/engine/grammar.py)
        engine["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        llm = _start_async_llm(engine)
        layers = adapter.layer_names
        return cls(llm, tokenizer, model_name=settings.served_model_name or default_model_name(settings.model),
                   max_model_len=llm.model_config.max_model_len, layer_names=layers,
                   state_shape=(len(layers), *adapter.config.state_shape), adapter_fingerprint=adapter.fingerprint,
                   model_fingerprint=config_fingerprint(hf_config),
                   eos_token_ids=eos_token_ids(generation_config, hf_config, tokenizer))

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False

    async def stop(self) -> None:
        """Abort what is still running (those turns commit nothing), then shut vLLM down."""
        self._stopping = True   # new requests are refused from here on
        llm = self.llm
        if llm is None:
            return
        if self._active:   # the engine stays reachable until the aborts have landed
            await llm.abort(list(self._active))
        self.llm = None
        handler = getattr(llm, "output_handler", None)
        if handler is not None:   # stop listening first: a dying engine is not an error here
            handler.cancel()
        await asyncio.to_thread(llm.shutdown)
        # AsyncLLM.__del__ shuts down again; at interpreter exit that fails noisily on torn-down globals
        llm.shutdown = lambda *args, **kwargs: None

    def health(self) -> dict[str, Any]:
        alive = self.llm is not None and not self.llm.errored
        return {"engine": "vllm", "worker_alive": alive, "active_requests": len(self._active),
                "state_rpcs": self.states.rpcs, "stop_replays": self.stop_replays}

    async def _rpc(self, method: str, args: tuple = ()) -> list[Any]:
        """collective_rpc to the workers (through `self.llm`, so nothing else keeps vLLM alive)."""
        if self.llm is None:
            raise EngineError("the vLLM engine is stopped")
        return await self.llm.collective_rpc(method, args=args)

    # --- states ---------------------------------------------------------------------------------
    def zero_state(self) -> torch.Tensor:
        return torch.zeros(self.state_shape, dtype=torch.float32)

    async def import_state(self, state: torch.Tensor) -> torch.Tensor:
        if tuple(state.shape) != self.state_shape:
            raise ValueError(f"state has shape {tuple(state.shape)}, the engine expects {self.state_shape}")
        if state.dtype != torch.float32:
            raise ValueError(f"state must be float32, got {state.dtype}")
        return state.detach().to("cpu", copy=True)

    async def export_state(self, state: torch.Tensor) -> torch.Tensor:
        return state.detach().to("cpu", torch.float32, copy=True)

    # --- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        from delta_mem_vllm.vllm.protocol import TurnParams

        if self._stopping or self.llm is None:
            raise EngineError("engine is not running")
        prompt, memory = list(request.prompt_token_ids), request.memory
        if not prompt:
            raise EngineError("empty prompt")
        if not 0 <= memory.write_start <= len(prompt):
            raise EngineError(f"write_start {memory.write_start} outside the prompt (length {len(prompt)})")
        initial = memory.initial_state
        if initial is not None and tuple(initial.shape) != self.state_shape:
            raise EngineError(f"initial state has shape {tuple(initial.shape)}, the engine expects {self.state_shape}")
        want_state = memory.write and memory.return_state
        key = _request_key(request.request_id)
        params = TurnParams.build(write_start=memory.write_start, write=memory.write, state=initial,
                                  save_key=key if want_state else None)
        sampling = self._sampling(request.sampling, len(prompt), params.to_kv_transfer_params())
        # the embedded engine's detokenizer and stop strings: both engines return the same text
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling.stop, min_tokens=request.sampling.min_tokens)
        top = request.sampling.logprobs
        generated: list[int] = []
        reason = None
        reported: dict[str, Any] | None = None
        fetching = False   # the saved state is being fetched (else it is dropped on the way out)
        rejected = False   # refused, or the engine stopped: it never existed in vLLM, nothing to drop
        self._active.add(key)
        try:
            async with contextlib.aclosing(self._vllm_generate(prompt, sampling, key)) as stream:
                async for out in stream:
                    completion = out.outputs[0]
                    new_ids, text = [], ""
                    logprobs = None if top is None else []
                    for i, token in enumerate(completion.token_ids):
                        new_ids.append(token)
                        if logprobs is not None:
                            logprobs.append(_token_logprob(token, completion.logprobs[i], top))
                        text += detok.add(token)
                        if detok.stopped:   # a stop string: later tokens were never shown, drop them
                            reason = "stop"
                            break
                    generated += new_ids
                    if reason is None and out.finished:
                        reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else "abort"
                        reported = out.kv_transfer_params
                    if reason is None:
                        yield GenerationOutput(request.request_id, new_ids, text, logprobs,
                                               completion_tokens=len(generated))
                        continue
                    final_ids, final_text, final_logprobs = new_ids, text + detok.flush(), logprobs
                    break
            # leaving the block aborted the request in vLLM if it was still running (a stop string)
            if reason is None:
                raise EngineError("vLLM ended the request without finishing it")
            final = GenerationOutput(request.request_id, final_ids, final_text, final_logprobs, finished=True,
                                     finish_reason=reason,
                                     prompt_tokens=len(prompt), completion_tokens=len(generated))
            if reason == "abort":
                final.error = "generation was aborted"
            elif want_state:
                fetching = True
                await self._settle(final, key, prompt, generated, memory, stopped_early=detok.stopped)
            elif not memory.write:   # read-only: the state is the one it started from
                final.final_state = initial if initial is not None else self.zero_state()
                final.written_token_ids, final.pending_token_ids = [], generated[-1:]
            else:
                self._account_stateless(final, prompt, generated, memory.write_start, reported)
            yield final
        except (RequestRejected, EngineStopped):
            rejected = True
            raise
        finally:
            self._active.discard(key)
            if want_state and not fetching and not rejected:   # aborted, or closed early: nobody reads it
                self.states.discard(key)

    async def _vllm_generate(self, prompt: list[int], sampling: Any, key: str) -> AsyncIterator[Any]:
        """vLLM's stream for one request; a dead or failing engine becomes an EngineError."""
        from delta_mem_vllm.vllm.compat import engine_failure_types, request_error_types

        llm = self.llm
        if llm is None or self._stopping:
            raise EngineStopped("the vLLM engine is stopped")
        try:   # closed here, not by the garbage collector: closing vLLM's stream aborts the request now
            async with contextlib.aclosing(llm.generate({"prompt_token_ids": prompt}, sampling, key)) as outs:
                async for out in outs:
                    yield out
        except engine_failure_types() as exc:
            raise EngineError(f"the vLLM engine failed: {exc}") from exc
        except request_error_types() as exc:   # vLLM's request validation (e.g. a schema it cannot compile)
            param = "response_format" if sampling.structured_outputs is not None else None
            raise RequestRejected(f"vLLM refused the request: {exc}", param=param) from exc

    async def _settle(self, final: GenerationOutput, key: str, prompt: list[int], generated: list[int],
                      memory: Any, *, stopped_early: bool) -> None:
        """The final state and the written/pending split, from the state the workers saved.

        A turn commits the state over exactly its tokens but the last (the last is written first in
        the next turn), as the embedded engine does. The saved state covers another count when the
        turn stopped early: on a stop string vLLM runs ahead of the detokenizer until the abort
        lands (more tokens), and an abort that finds the request preempted saves nothing (none).
        The state is then recomputed over exactly those tokens.
        """
        from delta_mem_vllm.vllm.protocol import SavedState, turn_token_split

        saved = await self.states.take(key)
        covered, state = saved["num_tokens"], SavedState.state_from_wire(saved)
        exact = len(prompt) + len(generated) - 1
        if covered != exact:
            if stopped_early:
                self.stop_replays += 1
            else:
                log.warning("request %s: the engine's state covers %d tokens, the turn %d: recomputed", key,
                            covered, exact)
            state, covered = await self._replay(prompt + generated[:-1], memory.initial_state, memory.write_start)
        if state is None:
            state = memory.initial_state if memory.initial_state is not None else self.zero_state()
        final.final_state = state
        final.written_token_ids, final.pending_token_ids = turn_token_split(prompt, generated, memory.write_start,
                                                                            covered)

    async def _replay(self, tokens: list[int], initial: torch.Tensor | None,
                      write_start: int) -> tuple[torch.Tensor | None, int]:
        """The state after writing `tokens` (read-only before write_start) from `initial`: a prefill."""
        from delta_mem_vllm.vllm.protocol import SavedState, TurnParams

        key = _request_key("replay")
        params = TurnParams.build(write_start=write_start, state=initial, save_key=key)
        sampling = self._sampling(SamplingParams(max_tokens=1, temperature=0.0), len(tokens),
                                  params.to_kv_transfer_params())
        self._active.add(key)
        pending = True   # a state may arrive that nobody will take
        try:
            async with contextlib.aclosing(self._vllm_generate(tokens, sampling, key)) as stream:
                async for _ in stream:
                    pass
            saved = await self.states.take(key)
            pending = False
        except (RequestRejected, EngineStopped):
            pending = False
            raise
        finally:
            self._active.discard(key)
            if pending:   # cancelled (the client left) or failed after vLLM had it: drop its state
                self.states.discard(key)
        if saved["num_tokens"] != len(tokens):
            raise EngineError(f"replaying the turn covered {saved['num_tokens']} of {len(tokens)} tokens")
        return SavedState.state_from_wire(saved), len(tokens)

    @staticmethod
    def _account_stateless(final: GenerationOutput, prompt: list[int], generated: list[int], write_start: int,
                           reported: dict[str, Any] | None) -> None:
        """Written/pending of a request nobody keeps the state of, when vLLM reported the count."""
        from delta_mem_vllm.vllm.protocol import turn_token_split

        covered = (reported or {}).get("deltamem_num_tokens")
        if isinstance(covered, int) and 0 <= covered <= len(prompt) + len(generated):
            final.written_token_ids, final.pending_token_ids = turn_token_split(prompt, generated, write_start,
                                                                                covered)

    def _sampling(self, sp: SamplingParams, prompt_len: int, kv_transfer_params: dict[str, Any]) -> Any:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        max_tokens = max(1, min(sp.max_tokens, self.max_model_len - prompt_len))
        return VllmSampling(
            n=1, max_tokens=max_tokens,
            temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            repetition_penalty=sp.repetition_penalty, presence_penalty=sp.presence_penalty,
            frequency_penalty=sp.frequency_penalty, min_tokens=min(sp.min_tokens, max_tokens), logprobs=sp.logprobs,
            seed=sp.seed,
            stop_token_ids=list(sp.stop_token_ids) or None, ignore_eos=sp.ignore_eos,
            logit_bias=dict(sp.logit_bias) or None, output_kind=RequestOutputKind.DELTA, detokenize=False,
            structured_outputs=_structured_outputs(sp.structured),
            extra_args={"kv_transfer_params": kv_transfer_params})


def _structured_outputs(spec: StructuredOutput | None) -> Any:
    from vllm.sampling_params import StructuredOutputsParams

    if spec is None:
        return None
    if spec.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=spec.schema)


def _token_logprob(token: int, entries: dict[int, Any], top: int) -> TokenLogprob:
    """vLLM's per-token logprobs (the sampled id plus the `top` best, each with its rank) as ours."""
    best = sorted((lp.rank, tid, lp.logprob) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= top)
    return TokenLogprob(token, entries[token].logprob, tuple((tid, logprob) for _, tid, logprob in best))


def _request_key(request_id: str) -> str:
    """A vLLM request id (they must be unique) that also keys the request's saved state."""
    return f"{request_id}-{uuid.uuid4().hex[:8]}"


def vllm_engine_settings(settings: Any) -> dict[str, Any]:
    """vLLM engine arguments from the server settings (only what the operator set, plus our defaults)."""
    from server.engine.vllm_cpu_defaults import settle_cpu_defaults

    settings = settle_cpu_defaults(settings)
    out: dict[str, Any] = {
        "dtype": settings.dtype,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "enforce_eager": settings.enforce_eager,
        "seed": settings.seed,
        "enable_prefix_caching": settings.enable_prefix_caching,
    }
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                 "kv_cache_memory_bytes"):
        value = getattr(settings, name)
        if value is not None:
            out[name] = value
    return out


def _start_async_llm(engine: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import vllm

    if not torch.cuda.is_available():
        # vLLM on a CPU reserves a core for the front end by default; on a small machine that halves
        # the engine's speed for little gain, so let the worker use them all unless told otherwise.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    else:
        # the runner the plugin is verified on (vLLM 0.32 would pick its V2 runner for hybrid models)
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if engine.get("tensor_parallel_size", 1) == 1:
        engine.setdefault("distributed_executor_backend", "uni")   # the worker inside the engine process
    log.info("starting the vLLM %s engine for %s", vllm.__version__, engine["model"])
    if not engine.get("enforce_eager") and not torch.cuda.is_available():
        # torch.compile says nothing while it works: tell the operator why the log goes quiet
        log.info("compiling the model with torch.compile: one to three minutes on a small CPU, quiet, faster when "
                 "its cache is warm (--enforce-eager starts in seconds and decodes 15-30% slower)")
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine))
