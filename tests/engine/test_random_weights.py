"""``random_weights`` is derived from the checkpoint itself, not only from our marker file: the
marker, a field in the safetensors header, or lm_head's no/yes rows that look like an untrained
initialisation (engine.loading.random_weights_evidence)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lychee_server.engine.checkpoint import RANDOM_WEIGHTS_MARKER
from lychee_server.engine.loading import RANDOM_WEIGHTS_METADATA, load_model, looks_untrained
from lychee_server.settings import Settings


def _load(directory: Path):  # type: ignore[no-untyped-def]
    return load_model(Settings(model=str(directory), device="cpu", dtype="float32", warmup=False))


def _copy(src: Path, dst: Path, marker: bool, metadata: bool) -> Path:
    shutil.copytree(src, dst)
    if not marker:
        (dst / RANDOM_WEIGHTS_MARKER).unlink()
    if not metadata:
        for path in dst.glob("*.safetensors"):
            save_file(load_file(str(path)), str(path), metadata={"format": "pt"})
    return dst


def test_test_checkpoint_declares_itself_in_marker_and_header(tiny_checkpoint: Path) -> None:
    assert (tiny_checkpoint / RANDOM_WEIGHTS_MARKER).is_file()
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as f:
        assert (f.metadata() or {}).get(RANDOM_WEIGHTS_METADATA) == "true"
    loaded = _load(tiny_checkpoint)
    assert loaded.random_weights and RANDOM_WEIGHTS_MARKER in loaded.random_weights_evidence


def test_header_alone_is_enough(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Weights copied without the marker file still say that they are random."""
    loaded = _load(_copy(tiny_checkpoint, tmp_path / "ckpt", marker=False, metadata=True))
    assert loaded.random_weights and RANDOM_WEIGHTS_METADATA in loaded.random_weights_evidence


def test_no_declaration_and_not_an_init_counts_as_trained(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The test weights have their own scale (not transformers' init): without marker or header
    field nothing says they are random, so the verdict is "trained" (no false alarm on weights
    that merely look unusual)."""
    loaded = _load(_copy(tiny_checkpoint, tmp_path / "ckpt", marker=False, metadata=False))
    assert not loaded.random_weights and loaded.random_weights_evidence == ""


def test_untrained_init_saved_without_any_mark_is_detected(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A model saved right after construction (transformers' init), with no marker and no header
    field, is recognised from its lm_head rows."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = _copy(tiny_checkpoint, tmp_path / "ckpt", marker=False, metadata=False)
    for path in out.glob("*.safetensors"):
        path.unlink()
    config = Qwen2_5_VLConfig(**json.loads((tiny_checkpoint / "config.json").read_text()))
    torch.manual_seed(3)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    loaded = _load(out)
    assert loaded.random_weights and "untrained" in loaded.random_weights_evidence


@pytest.mark.parametrize("hidden", [64, 2048, 3584])
def test_an_init_passes_at_every_width(hidden: int) -> None:
    for seed in range(20):
        init = torch.randn(2, hidden, generator=torch.Generator().manual_seed(seed)) * 0.02
        assert looks_untrained(init, 0.02) and looks_untrained(init.to(torch.bfloat16), 0.02)
        assert not looks_untrained(init * 3, 0.02)  # another scale


@pytest.mark.parametrize("hidden", [2048, 3584])  # the real widths (3B, 7B), where the tests have power
def test_what_training_changes_fails_the_statistics(hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    init = torch.randn(2, hidden, generator=gen) * 0.02
    assert not looks_untrained(init + 0.003, 0.02)  # a shared offset
    shared = torch.randn(hidden, generator=gen) * 0.02
    correlated = (init + 0.5 * shared) / 1.25**0.5  # same std, rows cos ~0.2
    assert not looks_untrained(correlated, 0.02)
    torch.manual_seed(hidden)
    t = torch.distributions.StudentT(5.0).sample((2, hidden))
    heavy = t / t.std() * 0.02  # same std, heavier tails than a Gaussian
    assert not looks_untrained(heavy, 0.02)
    assert not looks_untrained(torch.zeros(2, hidden), 0.02)
