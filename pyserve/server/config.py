"""How a server is run: addresses, access policy, TLS, data directory, shutdown drain, connection limits."""

import ipaddress
import ssl
from dataclasses import dataclass, field

from .auth import AccessPolicy
from .connections import HEADER_SECONDS, default_max_connections


@dataclass(kw_only=True)
class ServerConfig:
    """Options shared by both ports. Port 0 picks a free port; `msgpack_port=None` turns msgpack off.

    Example:
        ServerConfig(host="0.0.0.0", access=AccessPolicy(["k1"], admin_keys=["root"]),
                     ssl_certfile="cert.pem", ssl_keyfile="key.pem")
    """

    host: str = "127.0.0.1"
    port: int = 8000
    msgpack_port: int | None = 8001
    access: AccessPolicy = field(default_factory=AccessPolicy)
    # The data directory: stored completions and responses, files, feedback (None: in memory);
    # store every chat completion; expire stored records.
    data_dir: str | None = None
    store: bool = False
    store_days: float | None = None
    drain_seconds: float = 30.0
    # Open connections per port (None: from the descriptor limit, connections.default_max_connections)
    # and the seconds a request's headers (a msgpack frame) may take to arrive.
    max_connections: int | None = None
    header_seconds: float = HEADER_SECONDS
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    log_level: str = "info"
    # Hosts whose http(s) image URLs chat requests may name; none by default (data: URLs only).
    allowed_image_hosts: frozenset[str] = frozenset()
    # LoRA adapters to serve from the start: (name, PEFT adapter directory), onto the text model.
    lora_adapters: tuple[tuple[str, str], ...] = ()
    # Where each served model was loaded from: fine-tuning jobs train on these weights (a model
    # not named here cannot be fine-tuned). Jobs train one at a time (`finetune_jobs` at once),
    # in worker processes of `finetune_threads` torch threads each (None: torch's default), or in
    # actors on the Ray cluster at `finetune_ray_address` ("auto": the one this machine is in).
    model_dirs: dict[str, str] = field(default_factory=dict)
    finetune_jobs: int = 1
    finetune_threads: int | None = None
    finetune_ray_address: str | None = None

    def __post_init__(self):
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
        if self.max_connections is None:
            self.max_connections = default_max_connections()
        if self.max_connections < 1 or self.header_seconds <= 0:
            raise ValueError("max_connections and header_seconds must be positive")
        if self.finetune_jobs < 1 or (self.finetune_threads is not None and self.finetune_threads < 1):
            raise ValueError("finetune_jobs and finetune_threads must be positive")

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context for the msgpack port (uvicorn builds its own from the files)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: assume others can reach it
