"""Build a tiny, deterministic, random-weight Qwen2.5-VL checkpoint for tests and CPU benchmarks.

Why: no real weights can be downloaded in CI, but every code path (``from_pretrained`` of the model
and of the processor, the chat template, the tokenizer with Qwen's special tokens, the vision tower,
M-RoPE) must still be exercised exactly as with ``vec-ai/lychee-rerank-mm``. The directory written
here has the same layout as the real checkpoint (config.json, safetensors weights, tokenizer.json,
tokenizer_config.json, chat template, preprocessor config), only a few MB, generated at test time.

Two vocabularies: ``vocab="tiny"`` (the default) trains a small byte-level BPE on a built-in corpus;
``vocab="real"`` builds Qwen2's own tokenizer from its published byte-level BPE ranks (the
``qwen.tiktoken`` file that the ``dashscope`` wheel ships, see ``load_tiktoken_ranks``), with every
chat / vision special token at its real id (``<|image_pad|>`` = 151655) and a 151936-row embedding,
so ids, token boundaries and the prefix/document cut are those of the real checkpoint.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "QWEN2_ADDED_TOKENS",
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN2_VOCAB_SIZE",
    "QWEN_TIKTOKEN_MEMBER",
    "build_tiny_checkpoint",
    "load_tiktoken_ranks",
    "main_make_checkpoint",
    "qwen2_tokenizer_from_ranks",
    "tiktoken_to_bpe",
]

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


# ----------------------------------------------------------------------------- the real vocabulary

# Where the dashscope wheel keeps Qwen's ranks: one "base64(token bytes) rank" per line, ranks 0..151642.
QWEN_TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
# Qwen2's added tokens after its 151643 ranks, in id order (Qwen2.5-VL's tokenizer_config.json
# added_tokens_decoder / added_tokens.json: <|endoftext|> 151643 ... <|video_pad|> 151656 are special,
# the tool-call and fill-in-the-middle tokens 151657..151664 are added but not special).
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in SPECIAL_TOKENS),
    *(
        (t, False)
        for t in (
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        )
    ),
)
QWEN2_FIRST_ADDED_ID = 151643
# The embedding rows of Qwen2.5-VL-3B (the 7B pads to 152064): every added id has a row.
QWEN2_VOCAB_SIZE = 151936


def load_tiktoken_ranks(source: str | Path) -> dict[bytes, int]:
    """Qwen's BPE ranks from a ``qwen.tiktoken`` file, or from a wheel / zip that holds one at
    ``QWEN_TIKTOKEN_MEMBER`` (the dashscope wheel: read as a zip, dashscope is never imported)."""
    path = Path(source)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(QWEN_TIKTOKEN_MEMBER)
    else:
        raw = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}: line {n} is not 'base64-token rank'")
        token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        if token in ranks:
            raise ValueError(f"{path}: line {n}: token {token!r} ranked twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what ``pre_tokenizers.ByteLevel`` maps bytes to): printable
    Latin-1 bytes stand for themselves, the other 68 bytes for code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """tiktoken's byte-pair encoding of ``token`` using only ranks under ``below``: repeatedly merge
    the adjacent pair whose concatenation has the lowest rank (leftmost on a tie)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_at = r, i
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the HF byte-level BPE equivalent to tiktoken ``ranks``.

    The id of a token is its rank, its string the GPT-2 byte-level spelling of its bytes. A token of
    rank r longer than one byte is the merge of the two pieces that BPE with the ranks below r leaves
    of its bytes; merge i is the one that makes the token of the i-th lowest such rank, so the HF
    merge priority is tiktoken's rank order.
    """
    alphabet = _byte_to_unicode()
    singles = {t for t in ranks if len(t) == 1}
    if len(singles) != 256:
        raise ValueError(f"the ranks hold {len(singles)} of the 256 single bytes")

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(t): r for t, r in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens: {parts}"
            )
        merges.append((spell(parts[0]), spell(parts[1])))
    return vocab, merges


def qwen2_tokenizer_from_ranks(ranks: dict[bytes, int]) -> Any:
    """Qwen2's fast tokenizer (a ``tokenizers.Tokenizer``) built from its BPE ranks: NFC, the Qwen2
    split regex, ByteLevel without its own regex, BPE without byte fallback, ByteLevel decoder, and
    the added tokens of ``QWEN2_ADDED_TOKENS`` at 151643, 151644, ..."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    if len(ranks) != QWEN2_FIRST_ADDED_ID:
        raise ValueError(f"Qwen2 has {QWEN2_FIRST_ADDED_ID} ranked tokens, this file {len(ranks)}")
    vocab, merges = tiktoken_to_bpe(ranks)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for n, (content, special) in enumerate(QWEN2_ADDED_TOKENS):
        added = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
        count = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        got = tok.token_to_id(content)
        if count != 1 or got != QWEN2_FIRST_ADDED_ID + n:
            raise RuntimeError(f"{content} got id {got}, not {QWEN2_FIRST_ADDED_ID + n}")
    return tok


def _qwen2_tokenizer_config(out: Path) -> None:
    """Rewrite tokenizer_config.json as Qwen2.5-VL's: the Qwen2Tokenizer class (which
    ``AutoTokenizer`` then rebuilds from tokenizer.json's vocab and merges, as for the real checkpoint),
    no bos / unk token, eos <|im_end|>, pad <|endoftext|>, special tokens not split."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "unk_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "errors": "replace",
            "split_special_tokens": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
        }
    )
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


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


def build_tiny_checkpoint(
    path: str | Path, seed: int = 0, vocab: str = "tiny", tiktoken: str | Path | None = None
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to ``path`` (created) and return it.

    Deterministic for a given ``seed``; loads through the same ``from_pretrained`` path as the real model.
    ``vocab="real"`` uses Qwen2's real tokenizer, built from ``tiktoken`` (a ``qwen.tiktoken`` file or
    the dashscope wheel holding one; see ``load_tiktoken_ranks``), and 151936 embedding rows
    (about 80 MB of FP32 weights, the two 151936 x 64 matrices).
    """
    if vocab not in ("tiny", "real"):
        raise ValueError(f"vocab must be 'tiny' or 'real', not {vocab!r}")
    if (vocab == "real") != (tiktoken is not None):
        raise ValueError(
            "vocab='real' needs tiktoken= (the qwen.tiktoken file or the dashscope wheel), only it"
        )
    import torch
    from transformers import (
        AutoProcessor,
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    raw = (
        _train_tokenizer() if tiktoken is None else qwen2_tokenizer_from_ranks(load_tiktoken_ranks(tiktoken))
    )
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
    if vocab == "real":
        _qwen2_tokenizer_config(out)
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # padded like Qwen's 152064
    if vocab == "real":
        vocab_size = QWEN2_VOCAB_SIZE

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
    loaded = AutoProcessor.from_pretrained(out)
    if vocab == "real":
        got = {t: loaded.tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN2_ADDED_TOKENS}
        want = {t: QWEN2_FIRST_ADDED_ID + n for n, (t, _) in enumerate(QWEN2_ADDED_TOKENS)}
        if got != want or type(loaded.tokenizer).__name__ != "Qwen2Tokenizer":
            raise RuntimeError(
                f"the saved Qwen2 tokenizer reloads as {type(loaded.tokenizer).__name__}: {got}"
            )
    return out


def main_make_checkpoint(argv: list[str] | None = None) -> int:
    """CLI entry: ``lychee-rerank make-test-checkpoint DIR [--seed N] [--tiktoken FILE]``."""
    parser = argparse.ArgumentParser(prog="lychee-rerank make-test-checkpoint")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiktoken",
        type=Path,
        default=None,
        help="Qwen's qwen.tiktoken (or the dashscope wheel holding it): use the real Qwen2 vocabulary",
    )
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(
        args.directory,
        seed=args.seed,
        vocab="tiny" if args.tiktoken is None else "real",
        tiktoken=args.tiktoken,
    )
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_make_checkpoint())
