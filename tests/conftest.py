"""Shared fixtures: tiny official-format checkpoints written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Main variant: dense layer 0, MoE with shared expert, n_group 4 / topk_group 2, YaRN, no q_lora."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-main"), seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_q_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-q-lora"), seed=1, variant="q_lora")


@pytest.fixture(scope="session")
def tiny_checkpoint_a3b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A3B-faithful routing: one group, two shared experts fused into one SwiGLU, no YaRN."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-a3b"), seed=2, variant="a3b_routing")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path):
    from engine.loader import load

    return load(tiny_checkpoint, device="cpu", dtype=torch.float32)
