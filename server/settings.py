"""Server settings: the only place that reads environment variables (prefix ``E3RL_``).

Every field can come from the command line (``e3rl serve --max-num-seqs 32``), from the
environment (``E3RL_MAX_NUM_SEQS=32``); the command line wins.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from e3rl.engine import EngineConfig

from .healing_defaults import HealingDefaults, resolve

# The bundled model, trained by ``e3rl train`` into the repository's models/ folder.
DEFAULT_MODEL_NAME = "arith-chain"
DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / DEFAULT_MODEL_NAME
# The trajectory store's file, inside --data-dir.
STORE_FILE_NAME = "trajectories.sqlite3"


def default_num_threads() -> int:
    """Torch threads for the engine: every core this process may use but one, which the HTTP
    front end keeps (with all cores busy in torch, the event loop and the spinning OpenMP
    workers fight and latency explodes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class Settings(BaseSettings):
    """How ``e3rl serve`` runs: the model, the engine's limits, the HTTP front end, auth."""

    model_config = SettingsConfigDict(env_prefix="E3RL_", extra="ignore",
                                      protected_namespaces=())

    # -- model and engine ---------------------------------------------------------------
    model: str | None = Field(None, description="local model directory; default: the "
                              f"bundled model at models/{DEFAULT_MODEL_NAME}")
    served_model_name: str | None = Field(None, description="the name clients put in "
                                          "'model'; default: the model directory's name")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    block_size: int = Field(16, ge=1, description="tokens per KV block")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="KV cache budget in GiB")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV blocks (overrides the "
                                      "memory budget)")
    max_num_seqs: int = Field(64, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one step")
    max_model_len: int | None = Field(None, ge=2, description="context length; default: "
                                      "the model's")
    max_waiting: int = Field(1024, ge=1, description="waiting-queue size (requests); past "
                             "it the server answers 503")
    num_threads: int | None = Field(None, ge=1, description="torch threads on CPU; default: "
                                    "all cores but one")
    seed: int = Field(0, description="seed of the random streams of unseeded requests")
    attention_backend: Literal["auto", "native", "sdpa"] = Field("auto", description="decode attention: auto | native | "
                                   "sdpa (native: e3rl's C++ paged kernel, CPU only)")
    model_impl: Literal["auto", "e3rl", "transformers"] = Field(
        "auto", description="the model's forward: auto | e3rl | transformers (e3rl: its own "
        "forward of Llama-family models on CPU in bf16; auto: e3rl's where it applies)")
    enable_prefix_caching: bool = Field(False, description="automatic prefix caching: reuse "
                                        "the KV blocks of a cached prompt prefix (off by "
                                        "default; see README 'Prefix caching')")
    engine_process: bool = Field(True, description="run the engine loop in a process of its "
                                 "own, so the HTTP front end never shares a GIL with it (off: "
                                 "a thread of the server process)")
    healing: dict | None = Field(None, description="server-wide self-healing defaults as "
                                 "JSON for every request, e.g. '{\"enabled\": true, "
                                 "\"kappa\": 2}' or '{\"enabled\": false}'; a request's "
                                 "'healing' object overrides them (default: sampled requests "
                                 "heal when the model ships e3rl_healing.json, else off)")

    # -- HTTP ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    api_key: SecretStr | None = Field(None, description="if set, every API route needs "
                                      "'Authorization: Bearer KEY'")
    metrics_require_auth: bool = Field(False, description="protect /metrics with the API key")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request "
                                   "body accepted (413 above)")
    max_n: int = Field(64, ge=1, description="largest n / best_of of one request")
    log_level: str = Field("info", description="debug | info | warning | error")
    access_log: bool = Field(True, description="log one line per HTTP request (no bodies)")
    admin_port: int | None = Field(None, ge=1, le=65535, description="a second port, on the "
                                   "same host, that alone serves the admin and trajectory "
                                   "routes (and /health); the main port then answers them "
                                   "404, so that a NetworkPolicy can admit only the trainer "
                                   "to them (default: one port serves everything)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM or SIGINT, how long "
                                   "running requests may take to finish while /ready answers "
                                   "503 and new completions are refused; those still running "
                                   "then are aborted")

    # -- trajectory store and admin API -------------------------------------------------
    data_dir: Path = Field(Path("e3rl-data"), description="where the trajectory store "
                           f"lives ({STORE_FILE_NAME}); relative paths from the working "
                           "directory")
    store: Literal["all", "erasures", "none"] = Field(
        "all", description="which finished requests' trajectories are stored: all, only those "
        "with at least one erasure, or none")
    store_retention_rows: int | None = Field(None, ge=1, description="keep at most this many "
                                             "newest trajectories (default: all)")
    store_retention_age_s: float | None = Field(None, gt=0, description="delete trajectories "
                                                "older than this many seconds (default: never)")
    store_max_rows: int | None = Field(None, ge=1, description="hard cap on stored "
                                       "trajectories: the oldest beyond it are deleted even if "
                                       "no consumer acknowledged them (counted and warned "
                                       "about); default: no cap")
    store_max_queue: int = Field(10_000, ge=1, description="trajectories waiting for the "
                                 "store's writer; past it they are dropped and counted, a "
                                 "request never blocks")
    store_wait_s: float = Field(5.0, gt=0, description="longest a response waits for its "
                                "trajectory's commit before it is released anyway (logged "
                                "and counted)")
    store_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite synchronous mode: FULL survives machine crashes, NORMAL "
        "only process crashes (faster where fsync is slow)")
    admin_key: SecretStr | None = Field(None, description="key of the admin routes "
                                        "(/v1/trajectories, /v1/admin/*), separate from the "
                                        "API key; unset: the admin routes are off (404)")
    checkpoint_dir: Path | None = Field(None, description="directory that weight updates "
                                        "must load from (POST /v1/admin/weights); unset: "
                                        "weight updates are refused")
    max_upload_bytes: int | None = Field(None, ge=1, description="largest checkpoint file "
                                         "accepted by POST /v1/admin/weights/upload (413 "
                                         "above); default: the served model's parameter "
                                         "bytes plus 16 MiB")

    # healing_defaults(), decided once (the engine reads the calibration once too).
    _healing_defaults: HealingDefaults | None = PrivateAttr(None)

    @field_validator("healing")
    @classmethod
    def _valid_healing(cls, value: dict | None) -> dict | None:
        from e3rl.engine import InvalidRequest
        from e3rl.engine.healer import HealingParams

        if value is None:
            return value
        try:
            HealingParams.from_dict(value)
        except InvalidRequest as exc:
            raise ValueError(f"healing: {exc}") from None
        return value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _separate_admin_key(self) -> "Settings":
        # The admin key can swap the weights and read every stored prompt: a client that
        # holds the API key must not hold it too.
        if (self.admin_key is not None and self.api_key is not None
                and hmac.compare_digest(self.admin_key.get_secret_value().encode(),
                                        self.api_key.get_secret_value().encode())):
            raise ValueError("admin_key must differ from api_key")
        return self

    @model_validator(mode="after")
    def _separate_admin_port(self) -> "Settings":
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError(f"--admin-port must differ from --port (both are {self.port})")
        return self

    @property
    def store_path(self) -> Path:
        return self.data_dir / STORE_FILE_NAME

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else DEFAULT_MODEL_PATH

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path.resolve().name

    def healing_defaults(self) -> HealingDefaults:
        """The self-healing defaults in force for requests that do not say, and their source:
        ``--healing`` if given, else the model's calibration file (sampled requests only),
        else off. The one place this is decided (``server/healing_defaults.py``)."""
        if self._healing_defaults is None:
            self._healing_defaults = resolve(self.healing, self.model_path)
        return self._healing_defaults

    def check_model(self) -> None:
        """Raise ``FileNotFoundError`` with a one-line message if the model is missing."""
        path = self.model_path
        if (path / "config.json").is_file():
            return
        if self.model is None:
            raise FileNotFoundError(
                f"the bundled model is missing ({path}); train it with `e3rl train` or pass "
                "--model PATH (or set E3RL_MODEL)")
        raise FileNotFoundError(f"no model directory at {path} (config.json missing)")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=str(self.model_path), dtype=self.dtype, device=self.device,
            block_size=self.block_size, kv_cache_memory_gb=self.kv_cache_memory_gb,
            num_kv_blocks=self.num_kv_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, max_waiting=self.max_waiting,
            num_threads=self.num_threads or default_num_threads(), seed=self.seed,
            attention_backend=self.attention_backend, model_impl=self.model_impl,
            enable_prefix_caching=self.enable_prefix_caching,
            served_model_name=self.model_name)
