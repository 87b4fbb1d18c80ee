"""Δ-Mem for transformers models."""

from .model import DeltaMemModel, DeltaMemOutput, find_attention_modules

__all__ = ["DeltaMemModel", "DeltaMemOutput", "find_attention_modules"]
