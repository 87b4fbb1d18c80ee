"""The Δ-Mem adapter configuration, byte-compatible with the reference `delta_mem_config.json`.

The reference serialises all 49 fields (active, archived and inert). We read and write the same
file; archived options must keep their defaults, inert ones are range-checked only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "delta_mem_config.json"

DELTA_HEADS = ("q", "k", "v", "o")
STATE_UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
WRITE_GRANULARITIES = ("token", "message_mean", "sentence_mean")
OUTPUT_INITS = ("zero", "random", "base_slice", "base_slice_fixed")
DELTA_SCALE_GRANULARITIES = ("layer", "head")

# Archived options: the reference still serialises them but refuses any non-default value.
ARCHIVED_DEFAULTS: dict[str, Any] = {
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft",
    "memory_partition_basis": "shared",
    "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax",
    "slot_read_top_k": 0,
    "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0,
    "global_memory_merge_mode": "gated_residual",
    "memory_reader_layers": (),
    "memory_readout_mode": "delta",
    "memory_write_source": "learned_hidden",
    "memory_write_proposals_per_message": 2,
    "synthetic_memory_slots": 1,
    "latent_memory_layers": (),
}


class DeltaMemConfigError(ValueError):
    """An invalid or unsupported Δ-Mem configuration; the message names the offending key."""


def _lower(value: Any) -> str:
    return str(value).strip().lower()


def normalize_delta_heads(heads: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = heads.split(",") if isinstance(heads, str) else list(heads)
    names = [_lower(h) for h in items if _lower(h)]
    if not names or names == ["none"]:
        return ()
    out: list[str] = []
    for name in names:
        if name not in DELTA_HEADS:
            raise DeltaMemConfigError(f"delta_heads: unsupported head {name!r}; expected a subset of {DELTA_HEADS}")
        if name not in out:
            out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class DeltaMemConfig:
    # --- active surface -------------------------------------------------------------------------
    rank: int = 8
    alpha: float = 16.0
    beta_bias_init: float = -1.5
    normalize_qk: bool = True
    couple_lambda: bool = True
    state_update_mode: str = "standard"
    rankwise_gates: bool = True
    output_init: str = "zero"
    base_slice_ref_width: int = 8
    online_gain: float = 0.05
    num_state_heads: int = 1
    # --- archived (must stay at their defaults) -------------------------------------------------
    num_memory_partitions: int = 1
    num_global_memory_partitions: int = 0
    memory_partition_routing: str = "soft"
    memory_partition_basis: str = "shared"
    tie_memory_partition_read_write: bool = False
    memory_partition_read_mode: str = "softmax"
    # --- inert ----------------------------------------------------------------------------------
    memory_partition_sigmoid_gate_bias_init: float = -2.0
    slot_read_top_k: int = 0
    global_memory_mode: str = "shared_rw"
    global_memory_read_top_k: int = 0
    global_memory_merge_mode: str = "gated_residual"
    global_memory_gate_bias_init: float = -2.0
    global_memory_read_logit_bias: float = 0.0
    memory_reader_layers: tuple[int, ...] = ()
    memory_reader_hidden_size: int = 1024
    memory_reader_residual_scale: float = 0.1
    memory_reader_read_only: bool = True
    memory_readout_mode: str = "delta"
    memory_write_source: str = "learned_hidden"
    memory_write_granularity: str = "token"
    memory_write_proposals_per_message: int = 2
    synthetic_memory_slots: int = 1
    latent_memory_layers: tuple[int, ...] = ()
    latent_memory_hidden_size: int = 1024
    latent_memory_residual_scale: float = 0.1
    latent_memory_slots: int = 4
    latent_memory_init_std: float = 0.002
    latent_gate_init: float = 0.01
    target_modules: tuple[str, ...] = ("self_attn",)
    target_layers: tuple[int, ...] = ()
    delta_heads: tuple[str, ...] = DELTA_HEADS
    delta_o_rmsnorm: bool = False
    delta_o_rmsnorm_eps: float = 1e-6
    trainable_delta_scale: bool = False
    delta_scale_init: float = 1.0
    delta_scale_max: float = 2.0
    delta_scale_granularity: str = "layer"
    delta_scale_parameterization: str = "alpha_over_rank"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        for key in ("target_modules", "target_layers", "memory_reader_layers", "latent_memory_layers"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            set_(key, tuple(int(v) if key != "target_modules" else str(v) for v in value))
        set_("delta_heads", normalize_delta_heads(self.delta_heads))
        for key in ("state_update_mode", "memory_write_granularity", "output_init", "delta_scale_granularity",
                    "delta_scale_parameterization", "memory_partition_routing", "memory_partition_basis",
                    "memory_partition_read_mode", "global_memory_mode", "global_memory_merge_mode",
                    "memory_readout_mode", "memory_write_source"):
            set_(key, _lower(getattr(self, key)))
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, why: str) -> DeltaMemConfigError:
            return DeltaMemConfigError(f"{key}: {why} (got {getattr(self, key)!r})")

        for key, default in ARCHIVED_DEFAULTS.items():
            if getattr(self, key) != default:
                raise bad(key, f"archived option, only the default {default!r} is supported")
        if self.rank < 1:
            raise bad("rank", "must be >= 1")
        if self.num_state_heads < 1:
            raise bad("num_state_heads", "must be >= 1")
        if self.base_slice_ref_width < 1:
            raise bad("base_slice_ref_width", "must be >= 1")
        if self.state_update_mode not in STATE_UPDATE_MODES:
            raise bad("state_update_mode", f"expected one of {STATE_UPDATE_MODES}")
        if self.memory_write_granularity not in WRITE_GRANULARITIES:
            raise bad("memory_write_granularity", f"expected one of {WRITE_GRANULARITIES}")
        if self.output_init not in OUTPUT_INITS:
            raise bad("output_init", f"expected one of {OUTPUT_INITS}")
        if self.delta_scale_granularity not in DELTA_SCALE_GRANULARITIES:
            raise bad("delta_scale_granularity", f"expected one of {DELTA_SCALE_GRANULARITIES}")
        if self.delta_scale_parameterization not in "alpha_over_rank":  # the reference's substring check
            raise bad("delta_scale_parameterization", "only 'alpha_over_rank' is supported")
        if self.delta_o_rmsnorm_eps <= 0:
            raise bad("delta_o_rmsnorm_eps", "must be > 0")
        if self.delta_scale_max <= 0:
            raise bad("delta_scale_max", "must be > 0")
        if not 0 < self.delta_scale_init < self.delta_scale_max:
            raise bad("delta_scale_init", "must satisfy 0 < delta_scale_init < delta_scale_max")
        for key in ("latent_memory_hidden_size", "latent_memory_slots"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("latent_memory_init_std", "latent_gate_init"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be > 0")

    # --- derived sizes ----------------------------------------------------------------------------
    @property
    def state_read_dim(self) -> int:
        """D = h·R, the width of the memory projections and of a read."""
        return self.rank * self.num_state_heads

    @property
    def gate_dim(self) -> int:
        """G: one gate per state row (rankwise) or one per state head."""
        return self.state_read_dim if self.rankwise_gates else self.num_state_heads

    @property
    def scale(self) -> float:
        """The correction scale alpha/rank (per-head rank, as the reference computes it)."""
        return self.alpha / self.rank

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's state for one sequence: [h, R, R]."""
        return (self.num_state_heads, self.rank, self.rank)

    def delta_scale_raw_init(self) -> float:
        clipped = min(max(self.delta_scale_init / self.delta_scale_max, 1e-4), 1 - 1e-4)
        return math.log(clipped / (1 - clipped))

    # --- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaMemConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DeltaMemConfigError(f"{unknown[0]}: unknown Δ-Mem config key")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "DeltaMemConfig":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"Δ-Mem config not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DeltaMemConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise DeltaMemConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "DeltaMemConfig":
        return dataclasses.replace(self, **changes)


assert len(dataclasses.fields(DeltaMemConfig)) == 49, "the reference config has exactly 49 keys"
