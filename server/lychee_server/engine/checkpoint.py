"""Build a tiny, deterministic, random-weight Qwen2.5-VL checkpoint for tests and CPU benchmarks.

Why: no real weights can be downloaded in CI, but every code path (``from_pretrained`` of the model
and of the processor, the chat template, the tokenizer with Qwen's special tokens, the vision tower,
M-RoPE) must still be exercised exactly as with ``vec-ai/lychee-rerank-mm``. The directory written
here has the same layout as the real checkpoint (config.json, safetensors weights, tokenizer.json,
tokenizer_config.json, chat template, preprocessor config), only a few MB, generated at test time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["QWEN2_VL_CHAT_TEMPLATE", "build_tiny_checkpoint", "main_make_checkpoint"]

# Qwen chat special tokens, in the same order (and so relative ids) as in the real tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat template (the ``chat_template`` of Qwen/Qwen2.5-VL-7B-Instruct, which the Lychee
# checkpoint keeps): a system turn, list content with text and image items, an image item as
# <|vision_start|><|image_pad|><|vision_end|>, a newline after each role and each <|im_end|>, and the
# generation prompt "<|im_start|>assistant\n". transformers renders it with trim_blocks/lstrip_blocks;
# no newline here follows a block tag, so every one is output. (An earlier version trimmed them all
# with "{%-" tags: the tiny checkpoint then scored at "assistant" instead of the real "\n".)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern, so boundary merges (" \n", ">:-") behave like the real tokenizer.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS_LINES: tuple[str, ...] = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided.",
    'Note that the answer can only be "yes" or "no".',
    "Given a web search query, retrieve relevant passages that answer the query",
    "<Instruct>: <Query>: <Document>: yes no yes no Yes No",
    "The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red sofa.",
    "Find the image that matches the caption. What is the capital of France? Paris is the capital.",
    "Machine learning models rank documents by relevance to a search query for retrieval systems.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -- ** ## !! ?? (a) [b] {c} <d> 'e' \"f\"",
    "system user assistant image picture video photo chart table figure diagram screenshot",
    "Ünïcödé text, emoji 🙂, 中文文本, русский текст, العربية, tabs\tand\nnewlines\r\n",
)


def _train_tokenizer(vocab_size: int = 640) -> object:
    """Train a byte-level BPE on a built-in corpus (deterministic, offline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = list(_CORPUS_LINES) * 8 + ["yes", "no", " yes", " no"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    # "yes" / "no" must be single tokens: they are the two score rows of lm_head.
    vocab = tok.get_vocab()
    missing = [w for w in ("yes", "no") if w not in vocab]
    if missing:
        tok.add_tokens(missing)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _config(vocab_size: int, ids: dict[str, int]) -> dict[str, object]:
    hidden, heads, kv_heads = 64, 4, 2  # head_dim 16 -> mrope_section sums to 8 (= head_dim / 2)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text,
        "text_config": {"model_type": "qwen2_5_vl_text", **text},
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


def _declare_random_in_headers(directory: Path) -> None:
    """Add ``lychee.random_weights`` to the header of every safetensors file in ``directory``, so
    the weights declare themselves random even when copied without the marker file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lychee_server.engine.loading import RANDOM_WEIGHTS_METADATA

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        meta[RANDOM_WEIGHTS_METADATA] = "true"
        save_file(load_file(str(path)), str(path), metadata=meta)


def build_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to ``path`` (created) and return it.

    Deterministic for a given ``seed``; loads through the same ``from_pretrained`` path as the real model.
    """
    import torch
    from transformers import (
        AutoProcessor,
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # padded like Qwen's 152064

    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
                "do_resize": True,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "min_pixels": 4 * 28 * 28,
                "max_pixels": 1280 * 28 * 28,
                "size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 1280 * 28 * 28},
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
            },
            indent=2,
        )
    )
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))

    config = Qwen2_5_VLConfig(**_config(vocab_size, ids))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Default init (std 0.02) gives near-constant scores; larger weights make the golden tests sharper.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.25 if "embed" in name else 0.12))
            elif "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    _declare_random_in_headers(out)
    # Declares the weights random, so a server loading this directory reports random_weights and
    # clients (the knowledge-base example) can say that its scores carry no meaning.
    (out / RANDOM_WEIGHTS_MARKER).write_text("random weights: a test checkpoint; scores carry no meaning\n")
    # Round-trip check: the processor must load from the directory like the real one.
    AutoProcessor.from_pretrained(out)
    return out


def main_make_checkpoint(argv: list[str] | None = None) -> int:
    """CLI entry: ``lychee-rerank make-test-checkpoint DIR [--seed N]``."""
    parser = argparse.ArgumentParser(prog="lychee-rerank make-test-checkpoint")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(args.directory, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_make_checkpoint())
