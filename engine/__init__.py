"""Kimi-VL in native PyTorch: ``engine.load(path)`` returns the model, processor and tokenizer."""

from engine.loader import CheckpointError, KimiVLBundle, load

__all__ = ["CheckpointError", "KimiVLBundle", "load"]
