"""The optimized Lychee (Qwen2.5-VL) scoring engine.

Why a hand-written decoder loop instead of ``model(**inputs)``: a reranker needs one number per
pair, so (1) the shared prefix (system + instruction + query, query image included) is run once per
request and its K/V reused for every document, (2) documents are batched with right padding and
pure causal attention (padding never leaks into real positions), (3) only the last real position
goes through the final layer's attention/MLP, the final norm and the two ``no``/``yes`` rows of
``lm_head``. The loop reads the model's own weight modules (q/k/v/o projections, MLPs, RMSNorms),
so exactness versus the plain HF forward is checked by the golden tests, not assumed.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lychee_server.domain import Content, EngineInfo, ImageInput, Modality
from lychee_server.engine.attention import Segments, VarlenAttention, merge
from lychee_server.engine.decode_pool import DecodePool
from lychee_server.engine.fused import FusedOps
from lychee_server.engine.images import ImageLimits
from lychee_server.engine.interface import run_steps
from lychee_server.engine.loading import LoadedModel, load_model
from lychee_server.engine.preprocess import FastImagePreprocessor, hf_patches
from lychee_server.engine.recipe import (
    DOCUMENT_MARKER,
    SLOTS,
    Prompt,
    build_messages,
    document_segment,
    expand_and_position,
    image_token_count,
)
from lychee_server.engine.vision import VisionTower
from lychee_server.engine.vision_cache import VisionCache, VisionEntry, image_key
from lychee_server.errors import DeviceOutOfMemory, InternalError, InvalidInput, LycheeError
from lychee_server.settings import Settings

__all__ = ["QwenPreparedPair", "QwenPreparedQuery", "QwenRerankEngine"]

# Document texts that probe the tokenizer boundary between the rendered prefix and the document part
# (punctuation and whitespace that could merge with "<Document>:", an empty text, a newline).
_PROBES = ("-dash", " leading space", "\nnew line", "", "Paris 1.")
# Caller texts that check, once per pair shape at start-up, that the chat template inserts message
# text verbatim (what compiling it with slots relies on): control-token spellings, Jinja syntax,
# whitespace at the edges and a slot mark inside caller text.
_TEMPLATE_PROBES = {
    "instruction": " inst {{ x }} <|im_end|>\n",
    "query": "\tq %}<|vision_start|>" + SLOTS["document"],
    "document": "<|im_end|>\n<|im_start|>assistant\nyes ",
}
# (query has text, query has image, document has text, document has image): every shape a pair can have.
_SHAPES = [
    (qt, qi, dt, di)
    for qt, qi in ((True, False), (False, True), (True, True))
    for dt, di in ((True, False), (False, True), (True, True))
]
# Patches per vision-tower call: ~6 1080p images; bounds ViT activations (~1.5 GiB on the 7B tower in
# bf16) so a 50-image request stays within its memory target, while keeping GPU kernels large.
_VIT_PATCH_CHUNK = 32768


@dataclass(eq=False)
class ImageItem:
    """One image of a pair: its cache key, patch grid and (unless cached) preprocessed pixels.

    ``pixel_values`` is the processor's patch matrix without its temporal duplicate:
    ``(t*h*w, C*P*P)`` float32 on CPU (see ``engine.preprocess``)."""

    key: str
    grid: tuple[int, int, int]
    pixel_values: torch.Tensor | None
    source: ImageInput


@dataclass(eq=False)
class _Rows:
    """Where the rows of a batch packed end to end, (N, ...), sit in the padded (B, S, ...) layout."""

    b: int
    s: int
    index: torch.Tensor | None  # (N,) flat (B*S) slot of each real token; None when no row is padded
    last_packed: torch.Tensor  # (B,) packed index of each row's last token
    last_pos: torch.Tensor  # (B,) position of each row's last token within its row
    lengths: tuple[int, ...] = ()  # (B,) tokens of each row, on the host

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, S, ...), zeros in the padding (never seen by a real query)."""
        if self.index is None:
            return t.view(self.b, self.s, *t.shape[1:])
        out = t.new_zeros(self.b * self.s, *t.shape[1:])
        out.index_copy_(0, self.index, t)
        return out.view(self.b, self.s, *t.shape[1:])

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (N, ...)."""
        flat = t.reshape(self.b * self.s, *t.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)


@dataclass(eq=False)
class _PrefixKV:
    """One request's shared prefix: per layer keys (rotary applied) and values, packed (P, KV, D)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def width(self) -> int:
        return int(self.keys[0].shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(eq=False)
class _PackedPrefix:
    """The prefixes of several requests for one batch: row ``i`` continues ``states[row_states[i]]``.

    For the padded path, keys are right-padded per layer to ``width`` when a layer runs (never all
    layers at once: on 7B a packed copy of every layer would be GBs); padded keys are masked out with
    ``lengths``. The varlen path reads each state once per layer instead (``engine.attention``).
    """

    states: list[_PrefixKV]
    row_states: tuple[int, ...]  # (B,) on the host
    rows: torch.Tensor  # (B,) index into ``states``
    lengths: torch.Tensor  # (B,) real prefix length of each row

    @property
    def width(self) -> int:
        return max(st.width for st in self.states)

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, KV, width, D) keys and values of layer ``li``, one padded copy per row."""
        width = self.width

        def pack(parts: list[torch.Tensor]) -> torch.Tensor:
            padded = torch.stack([F.pad(t, (0, 0, 0, 0, 0, width - t.shape[0])) for t in parts])
            return padded.index_select(0, self.rows).transpose(1, 2)

        return pack([st.keys[li] for st in self.states]), pack([st.values[li] for st in self.states])


@dataclass(eq=False)
class _VarlenPlan:
    """Segments of one batch for the varlen path (``engine.attention``): documents causal within
    themselves, and for the final layer one query per row; prefix segments group the rows of each
    request (rows of one request are contiguous in a varlen batch) against that request's keys."""

    doc: Segments
    last: Segments
    prefixes: list[_PrefixKV]
    pre: Segments | None
    pre_last: Segments | None

    def prefix_layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.prefixes) == 1:
            return self.prefixes[0].keys[li], self.prefixes[0].values[li]
        return (
            torch.cat([st.keys[li] for st in self.prefixes]),
            torch.cat([st.values[li] for st in self.prefixes]),
        )


@dataclass(eq=False)
class _PaddedPlan:
    """Masks of one batch for the padded path: ``mask`` (documents' queries over [prefix; rows];
    None = plain causal), ``kmask`` (each row's last query, final layer)."""

    rows: _Rows
    prefix: _PrefixKV | _PackedPrefix | None
    p: int
    mask: torch.Tensor | None
    kmask: torch.Tensor


@dataclass(frozen=True, eq=False)
class _DocTemplate:
    """The compiled pair after the shared prefix, for one document shape.

    A pair's ids are ``shared_raw + suffix.ids(values)``: the suffix starts at ``<Document>:``,
    where Qwen's pre-tokenizer always starts a new piece (the ``\n`` before it ends one), so no
    token spans the cut. That is verified per request against the uncut prompt (``_PROBES``).
    """

    suffix: Prompt
    empty_ids: np.ndarray  # full ids of the pair with an empty document text


@dataclass(eq=False)
class QwenPreparedQuery:
    instruction: str
    query: Content
    max_length: int
    values: dict[str, str]  # the caller texts of the prompt slots (document: "")
    shared_raw: np.ndarray  # un-expanded token ids of the reusable prefix
    shared_ids: np.ndarray  # expanded
    shared_pos: np.ndarray  # (3, P)
    next_pos: int
    images: list[ImageItem]
    state: _PrefixKV | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (doc has text, doc has image) -> template, or None where the cut was not exact (uncut then).
    templates: dict[tuple[bool, bool], _DocTemplate | None] = field(default_factory=dict)
    tenant: str = ""  # part of the vision-cache key (settings.vision_cache_scope)

    @property
    def shape(self) -> tuple[bool, bool]:
        return self.query.text is not None, self.query.image is not None

    @property
    def cost_tokens(self) -> int:
        return len(self.shared_ids)

    @property
    def num_images(self) -> int:
        return len(self.images)


@dataclass(eq=False)
class QwenPreparedPair:
    query: QwenPreparedQuery
    ids: np.ndarray  # expanded ids of the suffix (reuse) or of the whole pair
    positions: np.ndarray  # (3, L)
    images: list[ImageItem]  # images inside ``ids``, in order
    reuse: bool
    total_tokens: int
    truncated: bool
    num_images: int

    @property
    def cost_tokens(self) -> int:
        return len(self.ids)


_T = TypeVar("_T")
# Steps of a preemptible batch queued on a CUDA device ahead of the host (see score_steps).
_RUN_AHEAD = 2


class _Event(Protocol):
    def record(self) -> None: ...

    def synchronize(self) -> None: ...


def _cuda_event() -> _Event:
    return torch.cuda.Event()  # type: ignore[no-untyped-call]


def paced(
    steps: Generator[None, None, _T], run_ahead: int, new_event: Callable[[], _Event]
) -> Generator[None, None, _T]:
    """``steps`` with an event recorded at each pause; before pausing, the host waits until at most
    ``run_ahead`` steps are still queued on the device (the event of the step before them is done)."""
    queued: collections.deque[_Event] = collections.deque()
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: _T = stop.value
            return result
        event = new_event()
        event.record()
        queued.append(event)
        if len(queued) > run_ahead:
            queued.popleft().synchronize()
        yield


def _is_oom(exc: BaseException) -> bool:
    """A device allocation failure in any of its forms: the caching allocator's ``OutOfMemoryError``,
    a raw ``CUDA error: out of memory`` from a kernel launch, or a library (cuBLAS, cuDNN) failing
    to get its workspace. The scheduler answers all of them by splitting the batch."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        sign in text
        for sign in (
            "out of memory",
            "CUBLAS_STATUS_ALLOC_FAILED",
            "CUDNN_STATUS_ALLOC_FAILED",
            "CUDA_ERROR_OUT_OF_MEMORY",
        )
    )


class QwenRerankEngine:
    """Implements ``lychee_server.engine.interface.Engine`` for Qwen2.5-VL rerankers (Lychee).

    ``prepare_*`` are thread-safe (CPU worker threads); ``score`` must be called from one thread.
    """

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.settings = settings
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = loaded.device
        self.dtype = loaded.dtype
        tok = self.processor.tokenizer
        self._backend = tok.backend_tokenizer  # thread-safe encode, no padding/truncation state
        self._tokenizer = tok
        # Caller text is tokenized with special tokens split (docs/contract.md): a copy of the
        # tokenizer, so the shared one is never switched between modes by concurrent threads.
        self._plain = Tokenizer.from_str(self._backend.to_str())
        self._plain.no_padding()
        self._plain.no_truncation()
        self._plain.encode_special_tokens = True
        self._control = {t.content: int(i) for i, t in tok.added_tokens_decoder.items() if t.special}
        cfg = self.model.config
        inner = self.model.model
        self.lm: Any = inner.language_model if hasattr(inner, "language_model") else inner
        self.visual: Any = inner.visual if hasattr(inner, "visual") else self.model.visual
        # Fused elementwise kernels (engine.fused): one compiled kernel per RMSNorm, rotary and
        # SiLU*mul where torch.compile runs (settings.fused_kernels), the eager recipes otherwise.
        self.fused = FusedOps(settings.fused_kernels, self.device)
        self.tower = VisionTower(self.visual, self.fused)
        fast = FastImagePreprocessor(self.processor.image_processor)
        # Bit-exact or not used: the HF processor stays the fallback (e.g. another transformers version).
        self._fast_pre: FastImagePreprocessor | None = (
            fast if fast.self_check(self.processor.image_processor) else None
        )
        tcfg = getattr(cfg, "text_config", cfg)
        self.n_heads = int(tcfg.num_attention_heads)
        self.n_kv = int(tcfg.num_key_value_heads)
        self.head_dim = int(getattr(tcfg, "head_dim", None) or tcfg.hidden_size // self.n_heads)
        self.merge = int(cfg.vision_config.spatial_merge_size)
        self.image_token_id = int(cfg.image_token_id)
        self.im_end_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.im_end_id)
        self.yes_id = int(tok.convert_tokens_to_ids("yes"))
        self.no_id = int(tok.convert_tokens_to_ids("no"))
        unk = tok.unk_token_id
        if unk is not None and unk in (self.yes_id, self.no_id):
            raise InternalError("tokenizer has no single 'yes' / 'no' tokens")
        rot = self.lm.rotary_emb
        self.inv_freq = rot.inv_freq.detach().to(self.device, torch.float32)
        section = getattr(rot, "mrope_section", None)
        if section is None:
            rp = getattr(tcfg, "rope_parameters", None) or getattr(tcfg, "rope_scaling", None) or {}
            section = rp.get("mrope_section", [16, 24, 24])
        self.mrope_section = [int(s) for s in section]
        w = self.model.get_output_embeddings().weight
        # The score head in float32 (see _score_head): the two rows and the final norm's weight.
        self.w_no_yes: torch.Tensor = w[[self.no_id, self.yes_id]].detach().float().clone()
        self.norm_w: torch.Tensor = self.lm.norm.weight.detach().float().clone()
        self.norm_eps = float(self.lm.norm.variance_epsilon)  # Qwen2RMSNorm
        self._varlen, self.attention_backend = self._choose_attention(settings.attention_backend)
        self._prefix_lock = threading.Lock()
        self._live_prefix_bytes = 0  # prefix K/V of prepared queries not yet released
        # Query chunk of the prefixed attention: small on CPU (no launch cost), large on GPU.
        self._attn_chunk = 64 if self.device.type == "cpu" else 512
        self.limits = ImageLimits(
            max_image_pixels=settings.max_image_pixels,
            max_pixels=settings.max_pixels,
            max_decode_bytes=settings.image_decode_memory_mib * 2**20,
        )
        self.vision_cache = VisionCache(settings.vision_cache_entries, settings.vision_cache_mib * 2**20)
        self._settings_tag = (
            f"{loaded.model_id}@{loaded.revision}|{settings.min_pixels}|{settings.max_pixels}"
        )
        self._prompts, self._suffixes = self._compile_prompts()
        # Images decode in worker processes (killable, time-bounded); the calling thread only waits.
        self._decoder = DecodePool(
            settings.decode_processes or settings.decode_threads,
            self.limits,
            timeout_s=settings.image_decode_timeout_s,
        )
        self._info = EngineInfo(
            model_id=loaded.model_id,
            model_revision=loaded.revision,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            query_modalities=frozenset({Modality.TEXT, Modality.IMAGE}),
            document_modalities=frozenset({Modality.TEXT, Modality.IMAGE}),
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            random_weights=loaded.random_weights,
            quantization=loaded.quantization,
            attention=self.attention_backend,
        )

    def _choose_attention(self, spec: str) -> tuple[VarlenAttention | None, str]:
        """The decoder's attention path and a line saying which kernel runs it.

        'auto': the varlen path where torch's varlen kernel runs and agrees with the reference
        (CUDA), else the padded SDPA path. 'varlen': the varlen path always (on the reference where
        no kernel runs: exact, slower; how the CPU tests cover it). 'sdpa': the padded path."""
        if spec == "sdpa" or (spec == "auto" and self.device.type != "cuda"):
            return None, "sdpa (padded batches)"
        va = VarlenAttention(self.device, self.dtype, use_kernel=True)
        if spec == "auto" and not va.kernel:
            return None, f"sdpa (padded batches; varlen: {va.note})"
        return va, f"varlen ({va.note})"

    @classmethod
    def from_settings(cls, settings: Settings, shape: str | None = None) -> QwenRerankEngine:
        """Load the model named by ``settings`` (see ``loading.load_model``) and wrap it."""
        return cls(load_model(settings, shape=shape), settings)

    @property
    def info(self) -> EngineInfo:
        return self._info

    # ------------------------------------------------------------------ CPU side (thread-safe)
    def _encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as plain text: a special token's spelling becomes ordinary pieces."""
        return np.asarray(self._plain.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text if isinstance(text, str) else text[0]

    def _compile_prompts(
        self,
    ) -> tuple[dict[tuple[bool, bool, bool, bool], Prompt], dict[tuple[bool, bool, bool, bool], Prompt]]:
        """The chat template compiled once per pair shape (slots for caller text), and the part of
        each after the shared prefix where that prefix is the same for every document shape."""
        names = {i: t for t, i in self._control.items()}
        prompts: dict[tuple[bool, bool, bool, bool], Prompt] = {}
        for qt, qi, dt, di in _SHAPES:
            slots = {"instruction": SLOTS["instruction"]}
            if qt:
                slots["query"] = SLOTS["query"]
            if dt:
                slots["document"] = SLOTS["document"]
            rendered = self._render(
                build_messages(slots["instruction"], slots.get("query"), qi, slots.get("document"), di)
            )
            try:
                prompt = Prompt.compile(rendered, self._control, slots, self._encode)
            except ValueError as exc:
                raise InternalError(f"cannot compile the chat template: {exc}") from exc
            probe = {k: _TEMPLATE_PROBES[k] for k in slots}
            want = self._render(
                build_messages(probe["instruction"], probe.get("query"), qi, probe.get("document"), di)
            )
            if prompt.render(probe, names) != want:
                raise InternalError("the chat template does not insert message text verbatim; unsupported")
            prompts[(qt, qi, dt, di)] = prompt
        suffixes: dict[tuple[bool, bool, bool, bool], Prompt] = {}
        for shape, prompt in prompts.items():
            # Through the "\n" of the marker: the pre-tokenizer always cuts between it and
            # "<Document>:" (checked per request and document shape, _template()).
            head, tail = prompt.split(DOCUMENT_MARKER, 1)
            shared, _ = prompts[(*shape[:2], True, False)].split(DOCUMENT_MARKER, 1)
            if head.segments == shared.segments:
                suffixes[shape] = tail
        return prompts, suffixes

    def _image_item(self, image: ImageInput, tenant: str = "", request: object | None = None) -> ImageItem:
        scope = tenant if self.settings.vision_cache_scope == "tenant" else ""
        key = image_key(image.data, image.media_type.value, self._settings_tag, scope)
        grid = self.vision_cache.peek_grid(key)
        if grid is not None:
            return ImageItem(key, grid, None, image)
        return self._preprocess(key, image, request)

    def _preprocess(self, key: str, image: ImageInput, request: object | None = None) -> ImageItem:
        # Decoded in a worker process (engine.decode_pool); ``request`` lets cancel() stop it.
        pil = self._decoder.decode(image, request)
        if self._fast_pre is not None:
            patches, grid = self._fast_pre(pil)
        else:
            patches, grid = hf_patches(self.processor.image_processor, pil)
        if patches.dtype != self.dtype and self.dtype in (torch.bfloat16, torch.float16):
            # Cast here (the ViT's first op casts to its dtype anyway: the same rounding, done on a
            # worker): half the bytes to pin, copy and keep.
            patches = patches.to(self.dtype)
        if self.device.type == "cuda":
            # Pinned here, on the preparing thread, so the device thread's copy is a plain async DMA.
            patches = patches.pin_memory()
        return ImageItem(key, grid, patches, image)

    def prepare_query(
        self, instruction: str, query: Content, max_length: int, tenant: str = ""
    ) -> QwenPreparedQuery:
        images = [self._image_item(query.image, tenant, query)] if query.image is not None else []
        qt, qi = query.text is not None, query.image is not None
        values = {"instruction": instruction, "query": query.text or "", "document": ""}
        # The shared prefix: the prompt up to the "\n" of the document marker.
        empty_prompt = self._prompts[(qt, qi, True, False)]
        prefix, _ = empty_prompt.split(DOCUMENT_MARKER, 1)
        raw = prefix.ids(values)
        self._check_placeholders(raw, len(images))
        ids, pos, nxt = expand_and_position(raw, [i.grid for i in images], self.image_token_id, self.merge, 0)
        empty = empty_prompt.ids(values)
        minimum = len(empty) + sum(image_token_count(i.grid, self.merge) - 1 for i in images)
        if minimum > max_length:
            raise InvalidInput(
                f"instruction + query need {minimum} tokens, more than max_length {max_length}",
                reason="INPUT_TOO_LONG",
            )
        return QwenPreparedQuery(
            instruction, query, max_length, values, raw, ids, pos, nxt, images, tenant=tenant
        )

    def _check_placeholders(self, ids: np.ndarray, n_images: int) -> None:
        # Caller text cannot yield <|image_pad|> (special tokens are split), so a mismatch is a
        # template without one placeholder per image item.
        if int((ids == self.image_token_id).sum()) != n_images:
            raise InternalError("the chat template did not render one image placeholder per image")

    def prepare_pair(self, query: QwenPreparedQuery, document: Content) -> QwenPreparedPair:
        pq = query
        doc_images = (
            [self._image_item(document.image, pq.tenant, pq.query)] if document.image is not None else []
        )
        all_images = pq.images + doc_images
        d_text, d_img = document.text is not None, document.image is not None
        shape = (*pq.shape, d_text, d_img)
        values = {**pq.values, "document": document.text or ""}
        tpl = self._template(pq, shape)
        if tpl is not None:
            full = np.concatenate([pq.shared_raw, tpl.suffix.ids(values)])
        else:
            full = self._prompts[shape].ids(values)
        self._check_placeholders(full, len(all_images))
        extra = sum(image_token_count(i.grid, self.merge) - 1 for i in all_images)
        total = len(full) + extra
        truncated = False
        if total > pq.max_length:
            if tpl is not None:
                no_text = tpl.empty_ids
            else:
                no_text = self._prompts[shape].ids({**values, "document": ""})
            start, end = document_segment(full, no_text, self.im_end_id)
            excess = total - pq.max_length
            if excess > end - start:
                raise InvalidInput(
                    f"pair needs {total - (end - start)} tokens without any document text, "
                    f"more than max_length {pq.max_length}",
                    reason="INPUT_TOO_LONG",
                )
            full = np.concatenate([full[: end - excess], full[end:]])
            total -= excess
            truncated = True
        n_shared = len(pq.shared_raw)
        reuse = len(full) > n_shared and bool(np.array_equal(full[:n_shared], pq.shared_raw))
        if reuse:
            ids, pos, _ = expand_and_position(
                full[n_shared:], [i.grid for i in doc_images], self.image_token_id, self.merge, pq.next_pos
            )
            images = doc_images
        else:
            ids, pos, _ = expand_and_position(
                full, [i.grid for i in all_images], self.image_token_id, self.merge, 0
            )
            images = all_images
        return QwenPreparedPair(pq, ids, pos, images, reuse, total, truncated, len(doc_images))

    def _template(self, pq: QwenPreparedQuery, shape: tuple[bool, bool, bool, bool]) -> _DocTemplate | None:
        """The document part of this request's pairs of one document shape, so a document costs one
        tokenizer call on its own part. Used only where prefix + part reproduce the uncut prompt's
        ids for ``_PROBES`` (the cut is a token boundary after this query)."""
        key = (shape[2], shape[3])
        with pq.lock:
            if key in pq.templates:
                return pq.templates[key]
            tpl: _DocTemplate | None = None
            suffix = self._suffixes.get(shape)
            if suffix is not None:
                whole = self._prompts[shape]
                probes = _PROBES if shape[2] else ("",)
                exact = all(
                    np.array_equal(np.concatenate([pq.shared_raw, suffix.ids(v)]), whole.ids(v))
                    for v in ({**pq.values, "document": probe} for probe in probes)
                )
                if exact:
                    tpl = _DocTemplate(suffix, np.concatenate([pq.shared_raw, suffix.ids(pq.values)]))
            pq.templates[key] = tpl
            return tpl

    def release(self, query: QwenPreparedQuery) -> None:
        state, query.state = query.state, None
        if state is not None:
            with self._prefix_lock:
                self._live_prefix_bytes -= state.nbytes

    @property
    def live_prefix_bytes(self) -> int:
        """Device bytes held by the prefix K/V of prepared queries not yet released (admission)."""
        return self._live_prefix_bytes

    # ------------------------------------------------------------------ device side
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)
        return t.to(self.device)

    def _vision(self, items: Sequence[ImageItem]) -> dict[str, torch.Tensor]:
        return run_steps(self._vision_steps(items))

    def _vision_steps(self, items: Sequence[ImageItem]) -> Generator[None, None, dict[str, torch.Tensor]]:
        """Merged vision-tower outputs for ``items``: cache hits, else one ViT call per chunk."""
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, ImageItem] = {}
        for it in items:
            if it.key in found or it.key in todo:
                continue
            entry = self.vision_cache.get(it.key)
            if entry is not None:
                found[it.key] = entry.embeds
            else:
                todo[it.key] = it
        chunk: list[ImageItem] = []
        patches = 0
        for it in todo.values():
            pv = it.pixel_values
            if pv is None:  # evicted between prepare and score: preprocess again
                pv = self._preprocess(it.key, it.source).pixel_values
                it = ImageItem(it.key, it.grid, pv, it.source)
            assert pv is not None
            if chunk and patches + pv.shape[0] > _VIT_PATCH_CHUNK:
                found.update((yield from self._run_vit(chunk)))
                chunk, patches = [], 0
            chunk.append(it)
            patches += pv.shape[0]
        if chunk:
            found.update((yield from self._run_vit(chunk)))
        return found

    def _run_vit(self, items: list[ImageItem]) -> Generator[None, None, dict[str, torch.Tensor]]:
        pv = [self._to_device(it.pixel_values) for it in items if it.pixel_values is not None]
        out = yield from self.tower.steps(pv, [it.grid for it in items])
        sizes = [image_token_count(it.grid, self.merge) for it in items]
        result: dict[str, torch.Tensor] = {}
        for it, emb in zip(items, torch.split(out, sizes), strict=True):
            # A split is a view that would keep the whole chunk's output alive while the cache
            # counts only this image's bytes: cache an own copy (kept only if the cache can hold it).
            result[it.key] = emb
            self.vision_cache.put(it.key, VisionEntry(it.grid, emb.clone()))
        return result

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (..., head_dim) for 3-D positions (3, ...), interleaving axes by mrope_section."""
        freqs = pos[..., None].float() * self.inv_freq  # (3, ..., d/2)
        parts = freqs.split(self.mrope_section, dim=-1)
        f = torch.cat([p[i % 3] for i, p in enumerate(parts)], dim=-1)
        emb = torch.cat([f, f], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        rep = self.n_heads // self.n_kv
        return x if rep == 1 else x.repeat_interleave(rep, dim=1)

    def _embed(
        self, rows: Sequence[tuple[np.ndarray, np.ndarray, list[ImageItem]]], vis: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, _Rows]:
        """Token embeddings (N, H) and 3-D positions (3, N) of ``rows`` packed end to end, no padding.

        Every index is computed on the host and copied asynchronously: no boolean mask (its size
        would need a device-to-host sync) ever touches a device tensor."""
        lengths = [len(r[0]) for r in rows]
        s = max(lengths)
        ids = np.concatenate([r[0] for r in rows]).astype(np.int64, copy=False)
        pos = np.concatenate([r[1] for r in rows], axis=1).astype(np.int64, copy=False)
        ends = np.cumsum(lengths)
        index: torch.Tensor | None = None
        if any(n != s for n in lengths):
            flat = np.concatenate([i * s + np.arange(n) for i, n in enumerate(lengths)])
            index = self._to_device(torch.from_numpy(flat))
        meta = _Rows(
            b=len(rows),
            s=s,
            index=index,
            last_packed=self._to_device(torch.from_numpy(ends - 1)),
            last_pos=self._to_device(torch.tensor(lengths, dtype=torch.int64) - 1),
            lengths=tuple(lengths),
        )
        ids_t = self._to_device(torch.from_numpy(ids))
        h = self.lm.embed_tokens(ids_t)
        embeds = [vis[it.key] for r in rows for it in r[2]]
        if embeds:
            where = self._to_device(torch.from_numpy(np.flatnonzero(ids == self.image_token_id)))
            h = h.index_copy(0, where, torch.cat(embeds, dim=0).to(h.dtype))
        return h, self._to_device(torch.from_numpy(pos)), meta

    def _forward_steps(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        rows: _Rows,
        prefix: _PrefixKV | _PackedPrefix | None,
        prefix_mode: bool = False,
    ) -> Generator[None, None, torch.Tensor | _PrefixKV]:
        """Run the decoder over packed tokens ``h`` (N, H), pausing after each attention and MLP.

        ``prefix_mode``: return the K/V of every layer (one row, the request's shared prefix);
        otherwise return logit(yes) - logit(no) at each row's last position. ``prefix`` is one
        request's prefix shared by all rows, or per-row prefixes of several requests (packed).

        Norms, projections and MLPs (nearly all the FLOPs at real shapes) run on the N real tokens
        only. Attention runs either on packed tokens (``varlen`` backend, :meth:`_attend_varlen`) or
        on rows right-padded to (B, S) (``sdpa``, :meth:`_attend_padded`), where padded keys are
        never visible to a real query. A batch of a 300-token passage and four 20-token ones thus
        costs 380 tokens of MLP, not 1500.
        """
        b, n = rows.b, h.shape[0]
        cos, sin = self._rope(pos)  # (N, head_dim)
        cos3, sin3 = cos[:, None], sin[:, None]
        varlen = self._varlen is not None and not prefix_mode
        plan: _VarlenPlan | _PaddedPlan = (
            self._varlen_plan(rows, prefix) if varlen else self._padded_plan(rows, prefix, h.device)
        )
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        layers = self.lm.layers
        n_layers = len(layers)
        for li, layer in enumerate(layers):
            attn = layer.self_attn
            x = self.fused.norm(layer.input_layernorm, h)
            k = self.fused.rotary(attn.k_proj(x).view(n, self.n_kv, self.head_dim), cos3, sin3)
            v = attn.v_proj(x).view(n, self.n_kv, self.head_dim)
            if prefix_mode:
                keys.append(k)
                values.append(v)
                if li == n_layers - 1:
                    break
            last = not prefix_mode and li == n_layers - 1
            if last:
                # Final layer: only the last real position of each row matters.
                lp = rows.last_packed
                hl = h[lp]
                q = attn.q_proj(x[lp]).view(b, self.n_heads, self.head_dim)
                q = self.fused.rotary(q, cos3[lp], sin3[lp])
            else:
                q = self.fused.rotary(attn.q_proj(x).view(n, self.n_heads, self.head_dim), cos3, sin3)
            if isinstance(plan, _VarlenPlan):
                o = self._attend_varlen(plan, li, q, k, v, last)
            else:
                o = yield from self._attend_padded(plan, li, q, k, v, last)
            if last:
                hl = hl + attn.o_proj(o.reshape(b, -1))
                hl = hl + self.fused.mlp(layer.mlp, self.fused.norm(layer.post_attention_layernorm, hl))
                return self._score_head(hl)
            h = h + attn.o_proj(o.reshape(n, -1))
            yield
            h = h + self.fused.mlp(layer.mlp, self.fused.norm(layer.post_attention_layernorm, h))
            yield
        return _PrefixKV(keys, values)

    def _score_head(self, hl: torch.Tensor) -> torch.Tensor:
        """logit(yes) - logit(no) of the last hidden states (B, H), in float32 whatever the model's
        dtype: the final RMSNorm and the two lm_head rows. In BF16 the module's norm rounds to 8
        mantissa bits before the rows are applied, which turns near-equal documents into exact ties
        (ties break ``top_n`` cut-offs); FP32 here costs two rows, not the vocabulary."""
        hn = F.rms_norm(hl.float(), self.norm_w.shape, self.norm_w, self.norm_eps)
        logits = hn @ self.w_no_yes.t()
        return logits[:, 1] - logits[:, 0]

    # ---- attention, padded (B, S) layout: the SDPA fallback
    def _padded_plan(
        self, rows: _Rows, prefix: _PrefixKV | _PackedPrefix | None, device: torch.device
    ) -> _PaddedPlan:
        s = rows.s
        p = 0 if prefix is None else prefix.width
        mask: torch.Tensor | None = None
        key_ok: torch.Tensor | None = None  # (B, 1, 1, P + S): real prefix keys of each row
        if p:
            q_idx = torch.arange(s, device=device)[:, None]
            k_idx = torch.arange(p + s, device=device)[None, :]
            mask = ((k_idx < p) | (k_idx - p <= q_idx))[None, None]
            if isinstance(prefix, _PackedPrefix):
                key_ok = ((k_idx >= p) | (k_idx < prefix.lengths[:, None]))[:, None, None]
                mask = mask & key_ok
        kmask = (torch.arange(p + s, device=device)[None, :] <= (p + rows.last_pos)[:, None])[:, None, None]
        if key_ok is not None:
            kmask = kmask & key_ok
        return _PaddedPlan(rows, prefix, p, mask, kmask)

    def _attend_padded(
        self, plan: _PaddedPlan, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: bool
    ) -> Generator[None, None, torch.Tensor]:
        rows, prefix, b = plan.rows, plan.prefix, plan.rows.b
        scale = self.head_dim**-0.5
        kp = rows.pad(k).transpose(1, 2)  # (B, KV, S, D)
        vp = rows.pad(v).transpose(1, 2)
        if isinstance(prefix, _PackedPrefix):
            pk, pv = prefix.layer(li)
            kp, vp = torch.cat([pk, kp], dim=2), torch.cat([pv, vp], dim=2)
        elif prefix is not None and plan.p:
            pk = prefix.keys[li].transpose(0, 1)[None].expand(b, -1, -1, -1)
            pv = prefix.values[li].transpose(0, 1)[None].expand(b, -1, -1, -1)
            kp, vp = torch.cat([pk, kp], dim=2), torch.cat([pv, vp], dim=2)
        kr, vr = self._repeat_kv(kp), self._repeat_kv(vp)
        if last:  # q (B, heads, D): one query per row
            o = F.scaled_dot_product_attention(q[:, :, None], kr, vr, attn_mask=plan.kmask, scale=scale)
            return o[:, :, 0]
        qp = rows.pad(q).transpose(1, 2)  # (B, heads, S, D)
        if plan.mask is None:
            o = F.scaled_dot_product_attention(qp, kr, vr, is_causal=True, scale=scale)
        else:
            o = yield from self._prefixed_attention(qp, kr, vr, plan.mask, plan.p, scale)
        return rows.unpad(o.transpose(1, 2))  # (N, heads, D)

    def _prefixed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, p: int, scale: float
    ) -> Generator[None, None, torch.Tensor]:
        """Attention of document queries over [prefix; document] keys, in query chunks (a pause
        between chunks).

        A masked SDPA call computes every (query, key) score and then discards the causal upper
        triangle; cutting the queries into chunks that only see keys up to their own end skips most of
        that triangle (measured ~15% less attention time on CPU for 256-token documents; the saving
        grows with document length, e.g. ~1200-token image documents).
        """
        s = q.shape[2]
        chunk = self._attn_chunk
        if s <= chunk + chunk // 2:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out = torch.empty_like(q)
        for a in range(0, s, chunk):
            e = min(s, a + chunk)
            keys = p + e
            out[:, :, a:e] = F.scaled_dot_product_attention(
                q[:, :, a:e], k[:, :, :keys], v[:, :, :keys], attn_mask=mask[:, :, a:e, :keys], scale=scale
            )
            if e < s:
                yield
        return out

    # ---- attention on packed tokens (engine.attention): the varlen path
    def _varlen_plan(self, rows: _Rows, prefix: _PrefixKV | _PackedPrefix | None) -> _VarlenPlan:
        va = self._varlen
        assert va is not None
        cu = Segments.cumulative(rows.lengths)
        doc = va.segments(cu, cu)
        last = va.segments(range(rows.b + 1), cu)
        if prefix is None:
            return _VarlenPlan(doc, last, [], None, None)
        if isinstance(prefix, _PrefixKV):
            states, bounds = [prefix], [0, rows.b]
        else:
            rs = prefix.row_states
            bounds = [0] + [i for i in range(1, rows.b) if rs[i] != rs[i - 1]] + [rows.b]
            states = [prefix.states[rs[a]] for a in bounds[:-1]]
            if len({rs[a] for a in bounds[:-1]}) != len(states):
                raise InternalError("varlen batch rows of one request are not contiguous")
        cu_k = Segments.cumulative([st.width for st in states])
        pre = va.segments([cu[a] for a in bounds], cu_k)
        pre_last = va.segments(bounds, cu_k)
        return _VarlenPlan(doc, last, states, pre, pre_last)

    def _attend_varlen(
        self, plan: _VarlenPlan, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: bool
    ) -> torch.Tensor:
        va = self._varlen
        assert va is not None
        scale = self.head_dim**-0.5
        # Each row's own keys: causal for every token; the last token of a row sees its whole row.
        o, lse = va(q, k, v, plan.last if last else plan.doc, causal=not last, scale=scale)
        pre = plan.pre_last if last else plan.pre
        if pre is None:
            return o
        pk, pv = plan.prefix_layer(li)
        o2, lse2 = va(q, pk, pv, pre, causal=False, scale=scale)
        return merge(o, lse, o2, lse2)

    def _prefix_state(self, pq: QwenPreparedQuery, vis: dict[str, torch.Tensor] | None = None) -> _PrefixKV:
        state = pq.state
        if state is None:
            if vis is None or any(it.key not in vis for it in pq.images):
                vis = self._vision(pq.images)
            h, pos, meta = self._embed([(pq.shared_ids, pq.shared_pos, pq.images)], vis)
            out = run_steps(self._forward_steps(h, pos, meta, None, prefix_mode=True))
            assert isinstance(out, _PrefixKV)
            state = out
            pq.state = state
            with self._prefix_lock:
                self._live_prefix_bytes += state.nbytes
        return state

    def _batches(self, idx: list[int], pairs: Sequence[QwenPreparedPair]) -> list[list[int]]:
        """Length-sorted sub-batches within the token budget (padded tokens) and the pair limit."""
        order = sorted(idx, key=lambda i: len(pairs[i].ids), reverse=True)
        out: list[list[int]] = []
        cur: list[int] = []
        width = 0
        for i in order:
            n = len(pairs[i].ids)
            w = max(width, n)
            if cur and (
                w * (len(cur) + 1) > self.settings.batch_token_budget
                or len(cur) >= self.settings.max_batch_pairs
            ):
                out.append(cur)
                cur, w = [], n
            cur.append(i)
            width = w
        if cur:
            out.append(cur)
        return out

    def score(self, pairs: Sequence[QwenPreparedPair]) -> list[float]:
        with torch.inference_mode():  # once around the whole call, not at every step
            return run_steps(self._score_guarded(pairs))

    @torch.inference_mode()  # on a generator: entered at each resume (a paused batch is resumed later)
    def score_steps(self, pairs: Sequence[QwenPreparedPair]) -> Generator[None, None, list[float]]:
        """:meth:`score`, pausing at each preemption point (``engine.interface``): after each vision
        block and full-attention query chunk, each decoder attention and MLP, each batch's prefix.

        On CUDA kernel launches are asynchronous, so the host would reach every pause long before
        the device does and a batch enqueued at a pause would still run after the whole heavy
        batch: there the pauses are paced, with at most ``_RUN_AHEAD`` steps queued on the device
        ahead of the host (an event per step; the host waits for the oldest)."""
        steps = self._score_guarded(pairs)
        if self.device.type != "cuda":
            return (yield from steps)
        return (yield from paced(steps, _RUN_AHEAD, _cuda_event))

    def _score_guarded(self, pairs: Sequence[QwenPreparedPair]) -> Generator[None, None, list[float]]:
        oom = ""
        try:
            return (yield from self._score(pairs))
        except LycheeError:
            raise
        except Exception as exc:
            if not _is_oom(exc):
                raise InternalError(f"scoring failed: {type(exc).__name__}: {exc}") from exc
            oom = f"{type(exc).__name__}: {str(exc).split(chr(10), 1)[0]}"
        # Raised here, not chained inside the handler: the OOM's traceback holds the frames of the
        # failed forward (activations, packed prefixes), and the scheduler retries the split halves
        # while it still holds our error. Leaving the handler drops them, so the memory is free again.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise DeviceOutOfMemory(f"device out of memory scoring {len(pairs)} pairs ({oom})")

    def _score(self, pairs: Sequence[QwenPreparedPair]) -> Generator[None, None, list[float]]:
        result = [0.0] * len(pairs)
        groups: dict[int, list[int]] = {}
        queries: dict[int, QwenPreparedQuery] = {}
        fallback: list[int] = []
        for i, pr in enumerate(pairs):
            if pr.reuse:
                groups.setdefault(id(pr.query), []).append(i)
                queries[id(pr.query)] = pr.query
            else:
                fallback.append(i)
        # Requests whose pairs fit in one batch are pooled: many small concurrent requests then run
        # as a few full batches (per-row prefixes, see _PackedPrefix) instead of one small forward
        # each, which is what keeps a GPU busy. Larger requests keep their shared-prefix batches.
        planned = {qid: self._batches(idx, pairs) for qid, idx in groups.items()}
        small = [qid for qid, batches in planned.items() if len(batches) == 1]
        pooled = small if len(small) > 1 else []
        work: list[tuple[bool, list[list[int]]]] = [
            (True, batches) for qid, batches in planned.items() if qid not in pooled
        ]
        if pooled:
            pooled_batches = self._batches([i for qid in pooled for i in groups[qid]], pairs)
            if self._varlen is not None:
                # The varlen path reads each request's prefix once per batch: its rows contiguous.
                rank = {qid: r for r, qid in enumerate(pooled)}
                pooled_batches = [sorted(bt, key=lambda i: rank[id(pairs[i].query)]) for bt in pooled_batches]
            work.append((True, pooled_batches))
        if fallback:
            work.append((False, self._batches(fallback, pairs)))
        # The vision tower first, over every image of the call in full chunks (not a few images
        # between LLM batches); prefixes need their query images, documents theirs.
        vis = yield from self._vision_steps(
            [*(it for qid in groups for it in queries[qid].images), *(it for pr in pairs for it in pr.images)]
        )
        done: list[int] = []
        diffs: list[torch.Tensor] = []
        for reuse, batches in work:
            for batch in batches:
                prefix: _PrefixKV | _PackedPrefix | None = None
                if reuse:
                    prefix = self._batch_prefix([pairs[i].query for i in batch], vis)
                    yield
                rows = [(pairs[i].ids, pairs[i].positions, pairs[i].images) for i in batch]
                h, pos, meta = self._embed(rows, vis)
                diff = yield from self._forward_steps(h, pos, meta, prefix)
                assert isinstance(diff, torch.Tensor)
                done.extend(batch)
                diffs.append(diff)
        # One device-to-host copy at the end: a copy per batch would wait for that batch's kernels
        # before the next batch could even be queued.
        if diffs:
            for i, d in zip(done, self._readback(torch.cat(diffs)), strict=True):
                result[i] = d
        return result

    def _readback(self, diffs: torch.Tensor) -> list[float]:
        """The one device-to-host copy of a ``score()`` call (the sync audit allows only this one)."""
        return [float(d) for d in diffs.cpu().tolist()]

    def _batch_prefix(
        self, row_queries: list[QwenPreparedQuery], vis: dict[str, torch.Tensor] | None = None
    ) -> _PrefixKV | _PackedPrefix:
        """The shared prefix of a one-request batch, or the packed prefixes of a mixed batch."""
        order: dict[int, int] = {}
        states: list[_PrefixKV] = []
        for pq in row_queries:
            if id(pq) not in order:
                order[id(pq)] = len(states)
                states.append(self._prefix_state(pq, vis))
        if len(states) == 1:
            return states[0]
        idx = [order[id(pq)] for pq in row_queries]
        lengths = [states[i].width for i in idx]
        return _PackedPrefix(
            states,
            tuple(idx),
            self._to_device(torch.tensor(idx, dtype=torch.long)),
            self._to_device(torch.tensor(lengths, dtype=torch.long)),
        )

    def warmup(self) -> None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="PNG")
        from lychee_server.domain import DEFAULT_INSTRUCTION, MediaType

        self._decoder.prestart()  # the decoder processes boot while the warm-up forward runs
        tcfg = getattr(self.model.config, "text_config", self.model.config)
        vcfg = self.model.config.vision_config
        sizes = {int(tcfg.hidden_size), int(tcfg.intermediate_size), int(vcfg.hidden_size)}
        sizes.add(int(vcfg.intermediate_size))
        self.fused.warmup([self.dtype], sorted(sizes), head_dim=self.head_dim)
        pq = self.prepare_query(DEFAULT_INSTRUCTION, Content(text="warm-up query"), 512)
        try:
            docs = [
                Content(text="warm-up document"),
                Content(image=ImageInput(buf.getvalue(), MediaType.PNG)),
            ]
            self.score([self.prepare_pair(pq, d) for d in docs])
        finally:
            self.release(pq)
        self.vision_cache.clear()

    def cancel(self, query: Content) -> None:
        """Stop the image decodes of the request whose query is ``query`` (the very object passed to
        ``prepare_query``; identity, not equality): running ones are killed, queued ones never start
        and raise ``Cancelled``. For the scheduler, when a request is answered, failed or abandoned."""
        self._decoder.cancel(query)

    def close(self) -> None:
        """Kill the image decoder processes (a decode in flight fails at once)."""
        self._decoder.close()
