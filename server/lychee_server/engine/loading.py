"""Load the Qwen2.5-VL model and processor from Settings (local dir, hub id, or random weights).

Why here and not in the engine: loading is where every environment problem surfaces (no weights,
no network, no CUDA for 4-bit, no flash-attn). Each becomes a :class:`ModelLoadError` with a message
that says what to do, instead of a stack trace from deep inside transformers.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lychee_server.errors import Unavailable
from lychee_server.settings import Settings

__all__ = [
    "BUILTIN_SHAPES",
    "RANDOM_WEIGHTS_METADATA",
    "LoadedModel",
    "ModelLoadError",
    "load_model",
    "looks_untrained",
    "random_weights_evidence",
    "resolve_device",
    "resolve_dtype",
]

# Key in the safetensors header of a weights file whose tensors are random (engine.checkpoint writes
# it): it travels with the weights even when the directory around them (and its marker) does not.
RANDOM_WEIGHTS_METADATA = "lychee.random_weights"


class ModelLoadError(Unavailable):
    """The model or processor could not be loaded (reason MODEL_LOAD_FAILED, maps to UNAVAILABLE)."""

    default_reason = "MODEL_LOAD_FAILED"


def _shape(
    layers: int, hidden: int, inter: int, heads: int, kv: int, out_hidden: int, vocab: int = 152064
) -> dict[str, Any]:
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "use_sliding_window": False,
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text,
        "text_config": {"model_type": "qwen2_5_vl_text", **text},
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": out_hidden,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": hidden == 2048,
    }


# Real Qwen2.5-VL shapes for ``random_weights`` benchmarks (no download needed for the weights).
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b": _shape(28, 3584, 18944, 28, 4, 3584),
    "qwen2.5-vl-3b": _shape(36, 2048, 11008, 16, 2, 2048, vocab=151936),
}


_SPECIAL_TOKEN_KEYS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The config's special-token ids as the tokenizer in use numbers them.

    A built-in shape carries the real checkpoint's ids (``<|image_pad|>`` = 151655); with any other
    tokenizer (the tiny test one, when no real processor is at hand) the model must look for the ids
    that tokenizer actually produces, or every image placeholder would go unrecognised.
    """
    out: dict[str, int] = {}
    for key, token in _SPECIAL_TOKEN_KEYS.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            out[key] = tid
    return out


@dataclass
class LoadedModel:
    model: Any  # Qwen2_5_VLForConditionalGeneration
    processor: Any  # Qwen2_5_VLProcessor
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    model_id: str
    revision: str
    random_weights: bool = False
    random_weights_evidence: str = ""  # why random_weights is set (see random_weights_evidence)
    quantization: str = "none"  # "fp8": the LLM's linear layers replaced by engine.fp8.Fp8Linear


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def _resolve_attn(spec: str, device: torch.device) -> str:
    if spec != "auto":
        return spec
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _set_pixel_bounds(processor: Any, min_pixels: int, max_pixels: int) -> None:
    ip = processor.image_processor
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    # Older image processors read min_pixels/max_pixels attributes; newer ones only ``size`` (and warn
    # when the attributes are set), so only update attributes that are already in use.
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if getattr(ip, name, None) is not None:
            setattr(ip, name, value)


def looks_untrained(rows: torch.Tensor, init_std: float, sigmas: float = 6.0) -> bool:
    """True when ``rows`` (the ``no``/``yes`` rows of lm_head, (2, hidden)) are indistinguishable
    from transformers' untrained initialisation, i.i.d. N(0, ``init_std``²).

    Four tests, each at ``sigmas`` standard errors so a true random init passes all of them with
    probability ~1 - 1e-8: the standard deviation equals ``init_std``, the mean is 0, the two rows
    are uncorrelated, and the excess kurtosis is that of a Gaussian (0). Training moves every one
    of these: trained unembedding rows have their own scale, share directions (frequent answer
    tokens are strongly correlated) and are heavy-tailed (a few outlier dimensions), so a trained
    checkpoint passing all four at once is implausible. Weights that are random but not of that
    init (our test checkpoints use other scales) are declared by metadata or marker instead.
    """
    x = rows.detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] != 2 or x.shape[1] < 16 or init_std <= 0:
        return False
    d = x.shape[1]
    n = x.numel()
    flat = x.flatten()
    mean = float(flat.mean())
    std = float(flat.std())
    if std <= 0 or not math.isfinite(std):
        return False
    cos = float(torch.nn.functional.cosine_similarity(x[0], x[1], dim=0))
    kurt = float((((flat - mean) / std) ** 4).mean()) - 3.0
    return (
        abs(std / init_std - 1.0) <= sigmas / math.sqrt(2 * n)
        and abs(mean) <= sigmas * init_std / math.sqrt(n)
        and abs(cos) <= sigmas / math.sqrt(d)
        and abs(kurt) <= sigmas * math.sqrt(24.0 / n)
    )


def _metadata_flag(directory: Path) -> str:
    """The name of a safetensors file in ``directory`` whose header declares random weights."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # unreadable header: from_pretrained reports it, not this check
            continue
        if meta.get(RANDOM_WEIGHTS_METADATA, "").lower() in ("1", "true", "yes"):
            return path.name
    return ""


def random_weights_evidence(settings: Settings, model: Any, processor: Any) -> str:
    """Why the loaded weights are random, or "" when nothing says so. In order:

    1. ``settings.random_weights``: the model was built from its config, not loaded;
    2. a local checkpoint declares it: the ``RANDOM_WEIGHTS`` marker file or the
       ``lychee.random_weights`` field in a safetensors header (``make-test-checkpoint`` writes both);
    3. the checkpoint itself: lm_head's ``no``/``yes`` rows, the only ones a Lychee score reads, look
       like transformers' untrained initialisation (:func:`looks_untrained`), e.g. a model saved
       right after ``Qwen2_5_VLForConditionalGeneration(config)``.
    """
    from lychee_server.engine.checkpoint import RANDOM_WEIGHTS_MARKER

    if settings.random_weights:
        return "built from the config with random weights (random_weights setting)"
    directory = Path(settings.model)
    if directory.is_dir():
        if (directory / RANDOM_WEIGHTS_MARKER).is_file():
            return f"the checkpoint has a {RANDOM_WEIGHTS_MARKER} marker file"
        name = _metadata_flag(directory)
        if name:
            return f"{name} declares {RANDOM_WEIGHTS_METADATA} in its header"
    try:
        tok = processor.tokenizer
        ids = [int(tok.convert_tokens_to_ids("no")), int(tok.convert_tokens_to_ids("yes"))]
        weight = model.get_output_embeddings().weight
        cfg = getattr(model.config, "text_config", None) or model.config
        init_std = float(
            getattr(cfg, "initializer_range", None) or getattr(model.config, "initializer_range", 0)
        )
        usable = weight.is_floating_point() and weight.device.type != "meta"
        if usable and looks_untrained(weight[ids], init_std):
            return "lm_head's no/yes rows are indistinguishable from an untrained initialisation"
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
        pass  # a model without the usual lm_head: no statistical verdict
    return ""


def load_model(settings: Settings, shape: str | None = None) -> LoadedModel:
    """Load model + processor as ``settings`` say.

    ``shape`` (with ``settings.random_weights``) names a built-in config (``BUILTIN_SHAPES``); the
    processor then still comes from ``settings.model`` (a local dir or hub id), or from the tiny
    built-in tokenizer when that is not available, since benchmarks only need token ids.
    """
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attn = _resolve_attn(settings.attn_implementation, device)
    if attn == "flash_attention_2" and dtype == torch.float32:
        attn = "sdpa"  # flash-attn has no fp32 kernels
    if settings.quantization == "fp8":
        from lychee_server.engine.fp8 import fp8_supported

        ok, why = fp8_supported(device)
        if not ok:
            raise ModelLoadError(f"--quantization fp8: {why}; use --quantization none")
        if settings.load_in_4bit:
            raise ModelLoadError("--quantization fp8 and --load-in-4bit exclude each other; pick one")
    if settings.load_in_4bit and device.type != "cuda":
        raise ModelLoadError(
            "load_in_4bit needs CUDA (bitsandbytes 4-bit kernels are GPU-only); drop --load-in-4bit"
        )
    source = settings.model
    revision = settings.revision
    hint = (
        f"could not load {source!r}: pass a local checkpoint directory as --model, or pre-download it "
        "(huggingface-cli download vec-ai/lychee-rerank-mm) and set HF_HUB_OFFLINE=1"
    )
    try:
        # Pixel bounds are set on the image processor's ``size`` below, not passed here: kwargs given
        # to from_pretrained are replayed on every processor call, where transformers 5 deprecates them.
        processor = AutoProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{hint} ({type(exc).__name__}: {exc})") from exc
    _set_pixel_bounds(processor, settings.min_pixels, settings.max_pixels)

    try:
        if settings.random_weights:
            if shape is not None:
                if shape not in BUILTIN_SHAPES:
                    raise ModelLoadError(f"unknown shape {shape!r}; known: {sorted(BUILTIN_SHAPES)}")
                cfg_dict = dict(BUILTIN_SHAPES[shape])
                tok_len = len(processor.tokenizer)
                if tok_len > int(cfg_dict["vocab_size"]):
                    raise ModelLoadError(f"tokenizer of {source!r} ({tok_len}) does not fit shape {shape!r}")
                cfg_dict.update(_special_token_ids(processor.tokenizer))
                config = Qwen2_5_VLConfig(**cfg_dict)
            else:
                cfg_path = Path(source) / "config.json"
                if cfg_path.is_file():
                    config = Qwen2_5_VLConfig(**json.loads(cfg_path.read_text()))
                else:
                    config = Qwen2_5_VLConfig.from_pretrained(source, revision=revision)
            config._attn_implementation = attn
            for sub in ("text_config", "vision_config"):
                sub_cfg = getattr(config, sub, None)
                if sub_cfg is not None:
                    sub_cfg._attn_implementation = attn
            # Built and randomly initialised directly on the target device in the target dtype: no
            # CPU copy and no FP32 copy of the weights (a 7B model starts in seconds on a GPU). No
            # ``model.to(dtype)`` afterwards: it would also cast the FP32 rotary ``inv_freq`` buffers
            # to bf16 (wrong angles at large positions), unlike ``from_pretrained``.
            with torch.device(device):
                prev = torch.get_default_dtype()
                torch.set_default_dtype(dtype)
                try:
                    model = Qwen2_5_VLForConditionalGeneration(config)
                finally:
                    torch.set_default_dtype(prev)
        else:
            kwargs: dict[str, Any] = {"revision": revision, "attn_implementation": attn}
            if settings.load_in_4bit:
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
                )
                kwargs["device_map"] = {"": device.index or 0}
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=dtype, **kwargs)
            if not settings.load_in_4bit:
                model = model.to(device)
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"{hint} ({type(exc).__name__}: {exc})") from exc
    model.eval()
    model.requires_grad_(False)
    evidence = random_weights_evidence(settings, model, processor)  # before quantising lm rows' layers
    if settings.quantization == "fp8":
        from lychee_server.engine.fp8 import quantize_fp8

        inner = model.model
        quantize_fp8(inner.language_model if hasattr(inner, "language_model") else inner)
    return LoadedModel(
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        attn_implementation=attn,
        model_id=source if shape is None else f"random:{shape}",
        revision=revision or "",
        random_weights=bool(evidence),
        random_weights_evidence=evidence,
        quantization=settings.quantization,
    )
