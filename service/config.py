"""One ``Settings`` object: every option of ``gradsvc serve``, each also ``GRADSVC_<NAME>``."""

from __future__ import annotations

import ipaddress

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.engine.limits import Limits
from service.store import sqlite_options
from service.store.base import IDEMPOTENCY_TTL, JOB_TTL

_DEFAULT = Limits()
STORE_SCHEMES = ("memory://", "sqlite://", "redis://", "rediss://", "unix://")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADSVC_", extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind")
    store: str = Field(
        default="sqlite:///data/gradsvc.db",
        description=(
            "sqlite:///path, memory:// (a private temporary SQLite file shared by the "
            "workers, removed at exit) or redis://host:port/db"
        ),
    )
    idempotency_ttl: float = Field(
        default=IDEMPOTENCY_TTL,
        gt=0,
        description="seconds an Idempotency-Key's answer is kept, then deleted",
    )
    api_keys: str | None = Field(
        default=None, description="comma-separated API keys (Authorization: Bearer <key>)"
    )
    api_keys_file: str | None = Field(
        default=None, description="file of SHA-256 hex digests of API keys, one per line [label]"
    )
    admin_keys: str | None = Field(
        default=None,
        description="comma-separated operator keys: the only keys /metrics and /v1/workers take",
    )
    admin_keys_file: str | None = Field(
        default=None, description="file of SHA-256 hex digests of operator keys, one per line"
    )
    insecure: bool = Field(
        default=False, description="allow a non-loopback address without API keys"
    )
    log_level: str = Field(default="info", description="uvicorn's log level")
    devices: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?(,(cpu|cuda(:\d+)?))*)$",
        description="compute devices: auto (every CUDA device, else cpu), cpu, cuda:0,cuda:1",
    )
    workers_per_device: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="worker processes per device (default: 1 per GPU; one per 2 cores on cpu)",
    )
    queue_size: int = Field(
        default=64,
        ge=1,
        description="requests queued per worker at most; beyond it: 503 + Retry-After",
    )
    compute_timeout: float = Field(
        default=60.0, gt=0, description="seconds a request may take in a worker (504 over)"
    )
    batch_window_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="ms a worker waits to batch steps of like sessions; 0: no batching",
    )
    max_batch: int = Field(
        default=256, ge=1, le=65536, description="session steps in one batched computation"
    )
    session_cache: int = Field(
        default=1024, ge=0, description="sessions a worker keeps built in memory"
    )
    max_tensor_elements: int = Field(
        default=_DEFAULT.tensor_elements, ge=1, description="elements in one tensor"
    )
    max_batch_elements: int = Field(
        default=_DEFAULT.batch_elements, ge=1, description="elements of a batch's inputs"
    )
    max_activation_elements: int = Field(
        default=_DEFAULT.activation_elements, ge=1, description="elements a model may compute"
    )
    max_explain_elements: int = Field(
        default=_DEFAULT.explain_elements, ge=1, description="numbers an explained trace shows"
    )
    max_model_elements: int = Field(
        default=_DEFAULT.model_elements, ge=1, description="parameters in one model"
    )
    max_expression_length: int = Field(
        default=_DEFAULT.expression_length, ge=1, description="characters of an expression"
    )
    max_expression_depth: int = Field(
        default=_DEFAULT.expression_depth, ge=1, le=200, description="nesting of an expression"
    )
    max_expression_nodes: int = Field(
        default=_DEFAULT.expression_nodes, ge=1, description="nodes of an expression"
    )
    max_layers: int = Field(
        default=_DEFAULT.layers, ge=1, description="layers of a sequential model"
    )
    max_layer_width: int = Field(
        default=_DEFAULT.layer_width, ge=1, description="features of a linear layer"
    )
    max_hessian_params: int = Field(
        default=_DEFAULT.hessian_params,
        ge=1,
        description='trainable parameters a "hessian" quantity may span (422 too-large over)',
    )

    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="request body bytes (413 over)"
    )
    max_sessions_per_key: int = Field(
        default=1000, ge=1, description="live sessions per API key (429 quota-exceeded over)"
    )
    rate_limit: float = Field(
        default=50.0, ge=0, description="requests per second per API key; 0: off (429 over)"
    )
    max_train_steps: int = Field(
        default=1_000_000, ge=1, description="steps one training job may take (422 over)"
    )
    rate_burst: int = Field(default=100, ge=1, description="requests a key may send at once")
    max_inflight_per_key: int = Field(
        default=32, ge=1, description="requests one key may have in flight (429 over)"
    )
    max_jobs_per_key: int = Field(
        default=4, ge=1, description="active training jobs per key (429 quota-exceeded over)"
    )
    max_stored_bytes_per_key: int = Field(
        default=10 * 1024**3,
        ge=1,
        description=(
            "bytes one key may keep in the store: sessions, idempotency records, job datasets "
            "(429 quota-exceeded over)"
        ),
    )
    max_streams_per_key: int = Field(
        default=16, ge=1, description="open event streams per key (429 quota-exceeded over)"
    )
    max_request_bytes: int = Field(
        default=2 * 1024**3,
        ge=1,
        description="estimated peak memory of one request (422 too-large over)",
    )
    max_answer_bytes: int = Field(
        default=64 * 1024**2, ge=1, description="bytes of one JSON answer (422 too-large over)"
    )
    max_parsing_bytes: int = Field(
        default=256 * 1024**2,
        ge=1024,
        description="request body bytes being parsed at once, all requests together (503 over)",
    )
    body_timeout: float = Field(
        default=30.0, gt=0, description="seconds a request body may take to arrive (408 over)"
    )
    max_connections: int = Field(
        default=1024, ge=1, description="connections served at once (503 over)"
    )
    drain_seconds: float = Field(
        default=20.0,
        ge=0,
        le=3600,
        description=(
            "seconds after SIGTERM that the listener stays open answering new requests 503 "
            "(Retry-After) while those in flight finish; then the process exits 0"
        ),
    )
    job_ttl: float = Field(
        default=JOB_TTL, gt=0, description="seconds a finished training job is kept"
    )

    @field_validator("store")
    @classmethod
    def _known_store(cls, url: str) -> str:
        if not url.startswith(STORE_SCHEMES):
            raise ValueError(f"unknown store {url!r}: use memory://, sqlite:///path or redis://...")
        if url.startswith("sqlite://"):
            sqlite_options(url)
        return url

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _some_key(cls, keys: str | None, info: ValidationInfo) -> str | None:
        # Fail closed: a keys option that names no key must not leave the service open.
        if keys is not None and not any(key.strip() for key in keys.split(",")):
            flag = "--" + str(info.field_name).replace("_", "-")
            raise ValueError(
                f"{flag} {keys!r} holds no key: give at least one non-empty key "
                "(comma-separated), or leave the option out"
            )
        return keys

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if not self.keyed and not self.insecure and not _loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} with no API keys: anyone who can reach it "
                "could use it. Give --api-keys or --api-keys-file, or --insecure for a trusted "
                "network."
            )
        return self

    @property
    def keyed(self) -> bool:
        """Whether tenants need a key. Every keys option given yields a key, or the service
        does not start (``--api-keys`` here, a keys file when ``create_app`` reads it)."""
        return self.api_keys is not None or self.api_keys_file is not None

    def limits(self) -> Limits:
        return Limits(
            tensor_elements=self.max_tensor_elements,
            model_elements=self.max_model_elements,
            activation_elements=self.max_activation_elements,
            batch_elements=self.max_batch_elements,
            explain_elements=self.max_explain_elements,
            expression_length=self.max_expression_length,
            expression_depth=self.max_expression_depth,
            expression_nodes=self.max_expression_nodes,
            layers=self.max_layers,
            layer_width=self.max_layer_width,
            request_bytes=self.max_request_bytes,
            answer_bytes=self.max_answer_bytes,
            hessian_params=self.max_hessian_params,
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
