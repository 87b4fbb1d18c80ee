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
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

import torch

from server.engine.base import EngineError, GenerationOutput, GenerationRequest, SamplingParams
from server.engine.model_info import config_fingerprint, default_model_name, eos_token_ids

log = logging.getLogger("deltamem.engine")

STATE_TIMEOUT = 60.0   # seconds to wait for a finished request's state before failing the turn


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
        """Forget a key's state when it arrives (an aborted request's)."""
        self._add(key, None)

    def _add(self, key: str, future: asyncio.Future | None) -> None:
        self._waiting[key] = (future, time.monotonic() + self._timeout)
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
            pause = 0.0 if not found else pause
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
        self.states = StateCollector(llm.collective_rpc)
        self._active: set[str] = set()
        self._stopping = False

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Any) -> "VllmEngine":
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from delta_mem_vllm.adapter import load_adapter
        from delta_mem_vllm.vllm.compat import installed_version
        from delta_mem_vllm.vllm.launch import engine_kwargs

        installed_version()
        if not settings.model or not settings.adapter:
            raise EngineError("the vLLM engine needs --model and --adapter (or --demo)")
        adapter = load_adapter(settings.adapter)
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        hf_config = AutoConfig.from_pretrained(settings.model)
        try:
            generation_config = GenerationConfig.from_pretrained(settings.model)
        except OSError:
            generation_config = None
        engine = engine_kwargs(settings.model, settings.adapter, valid_vocab=len(tokenizer),
                               **vllm_engine_settings(settings))
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
        self._stopping = True
        llm, self.llm = self.llm, None
        if llm is None:
            return
        if self._active:
            await llm.abort(list(self._active))
        handler = getattr(llm, "output_handler", None)
        if handler is not None:   # stop listening first: a dying engine is not an error here
            handler.cancel()
        await asyncio.to_thread(llm.shutdown)

    def health(self) -> dict[str, Any]:
        alive = self.llm is not None and not self.llm.errored
        return {"engine": "vllm", "worker_alive": alive, "active_requests": len(self._active),
                "state_rpcs": self.states.rpcs}

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
        from delta_mem_vllm.vllm.protocol import SavedState, TurnParams, turn_token_split

        if self._stopping:
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
        key = f"{request.request_id}-{uuid.uuid4().hex[:8]}"   # vLLM request ids must be unique
        params = TurnParams.build(write_start=memory.write_start, write=memory.write, state=initial,
                                  save_key=key if want_state else None)
        sampling = self._sampling(request.sampling, len(prompt), params.to_kv_transfer_params())
        generated: list[int] = []
        finished = False
        self._active.add(key)
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt}, sampling, key):
                completion = out.outputs[0]
                generated.extend(completion.token_ids)
                if not out.finished:
                    yield GenerationOutput(request.request_id, list(completion.token_ids), completion.text,
                                           completion_tokens=len(generated))
                    continue
                finished = True
                reason = completion.finish_reason if completion.finish_reason in ("stop", "length") else "abort"
                final = GenerationOutput(request.request_id, list(completion.token_ids), completion.text,
                                         finished=True, finish_reason=reason, prompt_tokens=len(prompt),
                                         completion_tokens=len(generated))
                if reason == "abort":
                    final.error = "generation was aborted"
                    if want_state:
                        self.states.discard(key)
                elif want_state:
                    saved = await self.states.take(key)
                    covered = saved["output_token_ids"]
                    outputs = covered if len(covered) > len(generated) else generated
                    state = SavedState.state_from_wire(saved)
                    final.final_state = state if state is not None else (
                        initial if initial is not None else self.zero_state())
                    final.written_token_ids, final.pending_token_ids = turn_token_split(
                        prompt, list(outputs), memory.write_start, saved["num_tokens"])
                elif not memory.write:   # read-only: the state is the one it started from
                    final.final_state = initial if initial is not None else self.zero_state()
                    final.written_token_ids, final.pending_token_ids = [], generated[-1:]
                yield final
                return
        finally:
            self._active.discard(key)
            if not finished and want_state:   # closed early (disconnect): nobody reads its state
                self.states.discard(key)

    def _sampling(self, sp: SamplingParams, prompt_len: int, kv_transfer_params: dict[str, Any]) -> Any:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        return VllmSampling(
            n=1, max_tokens=max(1, min(sp.max_tokens, self.max_model_len - prompt_len)),
            temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed, stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None, ignore_eos=sp.ignore_eos,
            logit_bias=dict(sp.logit_bias) or None, output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True, extra_args={"kv_transfer_params": kv_transfer_params})


def vllm_engine_settings(settings: Any) -> dict[str, Any]:
    """vLLM engine arguments from the server settings (only what the operator set, plus our defaults)."""
    dtype = settings.dtype if settings.dtype != "auto" else None
    out: dict[str, Any] = {
        "dtype": dtype or ("float32" if not torch.cuda.is_available() else "auto"),
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
    if engine.get("tensor_parallel_size", 1) == 1:
        engine.setdefault("distributed_executor_backend", "uni")   # the worker inside the engine process
    log.info("starting the vLLM %s engine for %s", vllm.__version__, engine["model"])
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine))
