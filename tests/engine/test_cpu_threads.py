"""A serving process leaves a core to the event loop, tokenisation and image decoding (issue 14):
torch's intra-op threads are one fewer than the cores on the CPU device (oversubscribed barriers made
a small text request ~40x slower on a 2-core machine with one other busy process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lychee_server.engine import cpu_threads, load_engine
from lychee_server.settings import Settings


@pytest.mark.parametrize(("cores", "want"), [(1, 1), (2, 1), (16, 15)])
def test_auto_leaves_one_core(cores: int, want: int) -> None:
    assert cpu_threads(Settings(device="cpu"), cores=cores) == want


def test_explicit_threads_win() -> None:
    assert cpu_threads(Settings(device="cpu", cpu_threads=3), cores=2) == 3


def test_load_engine_applies_it(tiny_checkpoint: Path) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, before))
        engine = load_engine(
            Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", warmup=False)
        )
        try:
            assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) - 1)
        finally:
            engine.close()  # type: ignore[attr-defined]
    finally:
        torch.set_num_threads(before)
