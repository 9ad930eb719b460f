"""One frozen settings object for the whole server.

Every field is a ``lychee-rerank serve`` flag and a ``LYCHEE_<FIELD>`` environment variable
(pydantic-settings). It is built once in the CLI and passed down; nothing reads the
environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lychee_server.domain import DEFAULT_MAX_LENGTH

KiB = 1024
MiB = 1024 * KiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LYCHEE_", frozen=True, extra="forbid")

    # --- model / engine -------------------------------------------------------------
    model: str = Field("vec-ai/lychee-rerank-mm", description="Local checkpoint directory or hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: str = Field(
        "auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="'auto' = flash_attention_2 when flash-attn is installed on CUDA, else sdpa."
    )
    load_in_4bit: bool = Field(False, description="4-bit weights via bitsandbytes (CUDA only).")
    attention_backend: Literal["auto", "sdpa", "varlen"] = Field(
        "auto",
        description="Decoder attention after the shared prefix. 'varlen': packed tokens, no padding, GQA "
        "in the kernel, prefix K/V read in place and merged exactly by log-sum-exp (torch's varlen "
        "flash kernel on CUDA, an exact reference of the same contract elsewhere); 'sdpa': padded "
        "batches with a mask (the fallback); 'auto' = varlen on CUDA when the kernel runs, else sdpa.",
    )
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Fused elementwise kernels (RMSNorm, rotary, SiLU*mul) compiled with torch.compile, "
        "FP32 math inside. 'auto' = on for CUDA when the compiler works, off on CPU.",
    )
    quantization: Literal["none", "fp8"] = Field(
        "none",
        description="'fp8': the LLM's linear layers in float8 (per-channel weight, per-token activation "
        "scales; Hopper GPUs only). Reported by GetServerInfo.",
    )
    random_weights: bool = Field(
        False, description="Build the model from its config with random weights (benchmarks only)."
    )
    min_pixels: int = Field(4 * 28 * 28, ge=4 * 28 * 28, description="Processor lower bound on image pixels.")
    max_pixels: int = Field(
        1280 * 28 * 28, ge=4 * 28 * 28, description="Processor upper bound on image pixels."
    )
    vision_cache_entries: int = Field(
        2048, ge=0, description="Vision-tower outputs kept, keyed by image content hash (0 = off)."
    )
    vision_cache_mib: int = Field(
        2048,
        ge=0,
        description="Device memory the vision cache may hold, in MiB (a 1 Mpx image is ~9 MiB at 7B/bf16).",
    )
    vision_cache_scope: Literal["tenant", "global"] = Field(
        "tenant",
        description=(
            "Who shares vision-cache entries. 'tenant': only calls of the same tenant (api key), so a "
            "fast answer never tells a caller that someone else sent the image; 'global': every "
            "caller (more hits when tenants send the same images, but a timing side channel)."
        ),
    )
    decode_threads: int = Field(4, ge=1, description="CPU threads that decode and preprocess images.")
    cpu_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of a serving process (0 = auto: on the CPU device one "
        "core fewer than the machine has, so the event loop, tokenisation and image decoding keep "
        "a core; 1 on a GPU).",
    )
    decode_processes: int = Field(
        0, ge=0, description="Image decoder worker processes (0 = as many as decode_threads)."
    )
    image_decode_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Wall time one image may take to decode; past it the decoder process is killed "
        "and the image refused (IMAGE_DECODE_FAILED).",
    )
    image_decode_memory_mib: int = Field(
        2048,
        ge=64,
        description="Memory one image decode may need, estimated from its header before any pixel is "
        "decoded (IMAGE_TOO_MANY_PIXELS) and enforced in the decoder process.",
    )

    # --- request limits (reported by GetServerInfo) --------------------------------
    max_documents: int = Field(1000, ge=1, description="Documents per request.")
    max_instruction_bytes: int = Field(4 * KiB, ge=1, description="UTF-8 bytes of the instruction.")
    max_text_bytes: int = Field(256 * KiB, ge=1, description="UTF-8 bytes of one query or document text.")
    max_image_bytes: int = Field(16 * MiB, ge=1, description="Encoded bytes of one image.")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Decoded pixels of one image (decompression-bomb guard)."
    )
    max_id_bytes: int = Field(256, ge=1, description="UTF-8 bytes of a document id.")
    max_message_bytes: int = Field(16 * MiB, ge=1 * MiB, description="Largest single gRPC message accepted.")
    max_request_bytes: int = Field(
        512 * MiB, ge=1 * MiB, description="Total payload bytes of one streamed request."
    )
    max_chunk_bytes: int = Field(256 * KiB, ge=1, le=256 * KiB, description="Largest stream chunk.")
    stream_idle_timeout_s: float = Field(
        30.0, gt=0, description="A stream upload with no message for this long is ended (DEADLINE_EXCEEDED)."
    )
    max_buffered_bytes: int = Field(
        1024 * MiB,
        ge=1 * MiB,
        description="Stream payload all uploads together may hold; past it RESOURCE_EXHAUSTED + RetryInfo.",
    )
    oversize_refusal_delay_s: float = Field(
        0.25,
        ge=0,
        description="A request refused for exceeding a size or count limit is answered after this "
        "delay: a caller re-sending such requests in a loop is slowed down, a legitimate one loses it once.",
    )
    refused_bytes_burst: int = Field(
        256 * MiB,
        ge=1 * MiB,
        description="Bytes of refused (INVALID_ARGUMENT) requests one caller (API key, else address) "
        "may make the server receive before its next calls are refused unread "
        "(RESOURCE_EXHAUSTED / RATE_LIMITED).",
    )
    refused_bytes_per_s: float = Field(
        4 * MiB,
        ge=0,
        description="How fast a caller's refused bytes are forgiven "
        "(bytes per second; 0 = no per-caller limit).",
    )
    max_concurrent_calls: int = Field(
        1024, ge=1, description="Calls handled at once; past it RESOURCE_EXHAUSTED + RetryInfo at once."
    )
    max_length: int = Field(8192, ge=64, description="Upper bound a request may ask for as max_length.")
    default_max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=64, description="max_length when a request sets none."
    )

    # --- scheduler -----------------------------------------------------------------
    batch_token_budget: int = Field(16384, ge=64, description="Tokens per forward batch (padded).")
    max_batch_pairs: int = Field(64, ge=1, description="Pairs per forward batch.")
    max_batch_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits to fill.")
    max_inflight_pairs: int = Field(4096, ge=1, description="Admitted pairs before RESOURCE_EXHAUSTED.")
    heavy_pair_tokens: int = Field(
        1024,
        ge=1,
        description="Pairs above this many tokens (large images, long passages) queue in a lane of "
        "their own: lighter pairs are never batched with them and go first, so a text request does "
        "not wait behind image work queued before it; and a heavy batch on the device pauses at its "
        "next step (a vision block, an attention chunk, half a decoder layer) for a light batch.",
    )
    heavy_pair_max_wait_s: float = Field(
        2.0,
        ge=0,
        description="Once the oldest heavy pair has waited this long, every other batch is heavy "
        "(heavy work is delayed, never starved).",
    )
    retry_after_s: float = Field(0.5, ge=0, description="RetryInfo delay sent with RESOURCE_EXHAUSTED.")
    max_prefix_kv_mib: int = Field(
        16384,
        ge=1,
        description="Device memory the shared-prefix K/V of admitted requests may hold together (7B: "
        "~57 KiB per prefix token); past it new calls get RESOURCE_EXHAUSTED + RetryInfo.",
    )

    # --- transport / security ------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind (use 0.0.0.0 in containers).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    http_port: int | None = Field(
        8080,
        ge=0,
        le=65535,
        description="HTTP/JSON port (/v1/rerank, /rerank, /healthz, /readyz, /docs; 0 = pick a free one; "
        "'off' = no HTTP door).",
    )
    http_host: str | None = Field(None, description="Address the HTTP door binds (unset = --host).")
    http_timeout_s: float | None = Field(
        None, gt=0, description="Deadline of an HTTP request that sends no X-Request-Timeout (unset = none)."
    )
    image_url_fetch: bool = Field(
        False, description="HTTP door: let requests name images by http(s) URL (off by default: SSRF)."
    )
    image_url_allow_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts image URLs may name (exact, or '*.example.com'); empty = any public host. "
        "Private, loopback and link-local addresses are refused unless their host is listed.",
    )
    image_url_timeout_s: float = Field(10.0, gt=0, description="Time limit of one image URL fetch.")
    metrics_port: int | None = Field(9400, description="Prometheus /metrics port (unset = no metrics).")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds.")
    otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry: send traces by OTLP to this collector (e.g. http://127.0.0.1:4317; "
        "needs the 'tracing' extra). Unset = off, unless the standard OTEL_* variables turn it on.",
    )
    tls_cert: Path | None = Field(None, description="PEM server certificate (enables TLS).")
    tls_key: Path | None = Field(None, description="PEM server private key.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a cert (mTLS)."
    )
    api_keys: tuple[SecretStr, ...] = Field((), description="Accepted bearer tokens (empty = no auth).")
    api_keys_file: Path | None = Field(None, description="File with one accepted bearer token per line.")
    grace_period_s: float = Field(30.0, ge=0, description="How long in-flight calls may finish on SIGTERM.")
    max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="End each client connection after this many seconds (gRPC GOAWAY; clients reconnect at "
        "once), so round-robin clients re-resolve DNS and spread over replicas added later (unset = never).",
    )
    max_connection_age_grace_s: float | None = Field(
        None,
        ge=0,
        description="After --max-connection-age-s, how long calls still running on that connection may "
        "finish before it is closed (unset = as long as they take).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = Field(True, description="Structured JSON logs on stderr.")
    warmup: bool = Field(True, description="Run a warm-up forward before reporting SERVING.")

    @field_validator("http_port", "metrics_port", mode="before")
    @classmethod
    def _port_off(cls, value: object) -> object:
        """'off' / 'none' / '' turn an optional listener off (from a flag or a variable)."""
        if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
            return None
        return value

    @property
    def http_max_body_bytes(self) -> int:
        """Largest HTTP request body: one gRPC message's worth of payload after base64's 4/3 growth
        (images travel as base64 in JSON), plus 64 KiB for the JSON around it."""
        return -(-self.max_message_bytes * 4 // 3) + 64 * KiB

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels must not exceed max_pixels")
        if self.default_max_length > self.max_length:
            raise ValueError("default_max_length must not exceed max_length")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return self

    def all_api_keys(self) -> frozenset[str]:
        keys = {k.get_secret_value() for k in self.api_keys}
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.add(line.strip())
        return frozenset(keys)
