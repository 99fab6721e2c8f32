"""The one settings object, built once by the CLI from ``TELEREAD_*`` variables (nested with
``__``) and its command-line options (:func:`build`), then passed down frozen: no other module reads
the environment, and nothing changes a setting after start (``Settings.updated`` makes a changed
copy).

Embedded defaults need no servers: SQLite and a local object-store directory under ``data_dir``.
Secrets (S3 keys, the site token, a database URL with its password) are ``SecretStr``: they print
as ``**********`` and have no defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    backend: Literal["local", "s3"] = "local"
    # local
    root: Path | None = None  # default: <data_dir>/objects
    # s3
    endpoint: str = ""  # host:port
    bucket: str = "teleread"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    secure: bool = False
    region: str = "us-east-1"
    part_size: int = 16 * 1024 * 1024


class GrpcSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = 50051
    max_workers: int = 32  # threads answering unary calls
    # Streams run on the server's event loop and hold no thread while they wait. Their blocking
    # work (an upload's disk and database writes, a watch's snapshot, object reads) runs in a
    # pool of its own, so it never takes a thread from the unary calls.
    stream_workers: int = 32
    # Open streams one identity may have (Watch, WatchResults, StreamObject, Upload); more are
    # refused with RESOURCE_EXHAUSTED / STREAM_LIMIT. A gateway opens at most max(streams,
    # connections) uploads (4 by default) and pulls results with unary calls; the upload CLI 4;
    # a reading station one watch. 64 leaves room for several clients on one token and for the
    # streams of cut connections the hub has not noticed yet (ended by the idle time or keepalive).
    max_streams_per_identity: int = 64
    upload_idle_seconds: float = 60.0  # an upload stream with no message for this long is closed (UNAVAILABLE)
    keepalive_seconds: float = 60.0  # pings on connections with open calls find dead peers; 0: off
    watch_poll_seconds: float = 1.0  # the watch feed reads events this often without a wake-up (other hubs)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # client CA: set to require client certificates
    chunk_size: int = 1024 * 1024


class HttpSettings(BaseModel):
    """The hub's HTTP port: DICOMweb under /dicomweb (QIDO-RS), same identities as the gRPC API."""

    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = 8081  # 0: any free port; -1: no HTTP port


class QueueSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    routing_file: Path | None = None  # default: the packaged defaults/routing.toml
    lease_seconds: int = 600
    max_lease_seconds: int = 3600
    triage_workers: int = 2
    rules_file: Path | None = None  # default: the packaged models/rules/default.toml
    # default: the packaged models/rules/fusion.json (sensitive); fusion-balanced.json flags fewer
    fusion_policy: Path | None = None
    # how often a hub on PostgreSQL reads the database's time (and the simulation clock's offset)
    clock_refresh_seconds: float = 30.0
    timer_interval_seconds: float = 1.0  # between passes of the deadline sweeper; 0: no sweeper
    calendar_file: Path | None = None  # the working-hours calendar; default: the packaged defaults/calendar.toml
    offer_seconds: int = 120  # a new exam is its first offer's reader's alone this long (0: no first offer)


class NotifySettings(BaseModel):
    """Where the hub's notifications (a critical exam's alert, its escalations) go besides the
    station and ``read watch`` (``reader/hub/notify.py``): an HTTP webhook (JSON POSTed, with an
    ``Idempotency-Key``) and/or a command (the JSON on its standard input), for SMS, a pager or an
    enterprise chat. Neither set: notifications are recorded and marked undeliverable."""

    model_config = ConfigDict(frozen=True)

    webhook_url: str = ""
    command: list[str] = Field(default_factory=list)
    timeout_seconds: float = 5.0
    interval_seconds: float = 1.0  # between the notifier's passes; 0: no notifier thread
    max_attempts: int = 8


class IngestSettings(BaseModel):
    """The hub's clean-up of what uploads leave behind (``gateway/hub/janitor.py``)."""

    model_config = ConfigDict(frozen=True)

    abandoned_hours: float = 48.0  # an exam still receiving with no activity for this long expires
    orphan_grace_seconds: float = 3600.0  # an object or staging file with no row is deleted after this
    janitor_interval_seconds: float = 600.0  # between clean-up passes; 0: no clean-up
    janitor_first_seconds: float = 60.0  # the first pass, this long after the hub starts


class GatewaySettings(BaseModel):
    """The clinic gateway (``teleread gateway run``)."""

    model_config = ConfigDict(frozen=True)

    outbox: Path | None = None  # default: <data_dir>/gateway
    ae_title: str = "TELEREAD_GW"
    dicom_host: str = "0.0.0.0"  # modalities on the clinic LAN connect here
    dicom_port: int = 11112
    receivers: int = 1  # DICOM receiver processes; >1 spreads simultaneous associations over cores
    receiver_engine: Literal["reactor", "pynetdicom"] = "reactor"  # event-driven, or pynetdicom's stock acceptor
    hub: str = "127.0.0.1:50051"
    token: SecretStr = SecretStr("")  # the site's token from `teleread sites add`
    quiet_seconds: float = 30.0  # a study with no new instance for this long is complete
    priority: str = "routine"
    patient_class: str = ""  # where this clinic's patients are seen: outpatient, inpatient or emergency; '': not said
    poll_seconds: float = 0.5
    results_dir: Path | None = None  # signed reports for the clinic; default: <data_dir>/results
    results_poll_seconds: float = 10.0
    critical_hook: str = ""  # a command run with the printable report of each critical result
    watch_dir: Path | None = None  # files dropped here (WFDB pairs, DICOM); default: <data_dir>/watch
    watch_settle_seconds: float = 2.0  # a dropped file unchanged for this long is complete
    streams: int = 4  # objects uploaded at once
    in_flight_kib: int = 256  # most a stream sends beyond the hub's confirmed offset (what a cut re-sends); 0: none
    connections: int = 1  # TCP connections to the hub (more fill a long, lossy link under cubic; see README)
    max_kbps: float = 0.0  # upload limit in kilobits/s for all streams together; 0: none
    limit_windows: list[str] = Field(default_factory=list)  # local "HH:MM-HH:MM" when the limit applies; none: always
    routine_windows: list[str] = Field(default_factory=list)  # when routine exams may go; stat/urgent: always
    compression: str = "auto"  # gzip on the wire: "auto" (objects that shrink), "gzip" or "off"
    retry_base_seconds: float = 2.0  # backoff after a failed upload: uniform(0, min(cap, base * 2**n))
    retry_cap_seconds: float = 120.0
    keep_sent_hours: float = 24.0  # local copies of exams the hub committed are deleted after this
    # TLS to the hub (the default for a real clinic: the site token and patient data cross the uplink)
    tls_ca: Path | None = None  # the hub's CA certificate (PEM): TLS on
    tls_cert: Path | None = None  # this gateway's client certificate (mutual TLS)
    tls_key: Path | None = None  # its private key (0600)
    tls_server_name: str = ""  # the name in the hub's certificate, when the address differs
    insecure: bool = False  # plaintext to a hub that is not on this machine: only when set
    wfdb_wait_minutes: float = 30.0  # a dropped WFDB header whose signal file never comes is set aside after this


class ReportSettings(BaseModel):
    """The printable report the hub renders for every signed version (``TELEREAD_REPORT__*``)."""

    model_config = ConfigDict(frozen=True)

    font: Path | None = None  # TrueType .ttf/.ttc with Chinese glyphs; default: Debian's fonts-wqy-zenhei
    timezone: str = "Asia/Shanghai"  # the zone the PDF's times are printed in (an IANA name; shown beside them)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone name (e.g. Asia/Shanghai)") from None
        return value


class AuthSettings(BaseModel):
    """People's sign-in at the hub (``TELEREAD_AUTH__*``)."""

    session_idle_seconds: int = Field(default=900, ge=30)  # a session unused for this long lapses; each use renews it
    session_max_hours: float = Field(default=12.0, gt=0)  # no session lives longer, however much it is used
    min_password_length: int = Field(default=10, ge=8)


class StationSettings(BaseModel):
    """The reading station, the readers' web process (``TELEREAD_STATION__*``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    hub: str = "127.0.0.1:50051"  # the hub's gRPC address; the station calls it as the signed-in reader
    hub_http: str = "http://127.0.0.1:8081"  # the hub's HTTP port: /dicomweb is passed through to it
    idle_minutes: float = Field(default=15.0, gt=0)  # no key or click for this long: signed out
    # TLS for the browser (the hub's certificates from `teleread tls init` will do); cookies are Secure then
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # TLS to the hub
    hub_ca: Path | None = None
    hub_cert: Path | None = None  # client certificate when the hub requires one
    hub_key: Path | None = None
    hub_server_name: str = ""
    lease_renew_seconds: float = Field(default=120.0, gt=0)  # an open exam's claim is renewed this often
    viewer_dist: Path | None = None  # OHIF's built viewer; default: reader/viewer/node_modules/@ohif/app/dist


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TELEREAD_", env_nested_delimiter="__", extra="ignore", frozen=True)

    data_dir: Path = Path("./teleread-data")
    database_url: SecretStr = SecretStr("")  # default: sqlite:///<data_dir>/teleread.db
    log_level: str = "INFO"
    max_object_bytes: int = 2 * 1024**3
    cpu_workers: int = -1  # processes for parsing and triage; -1: one per core (max 4); 0: in-thread
    storage: StorageSettings = Field(default_factory=StorageSettings)
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    station: StationSettings = Field(default_factory=StationSettings)
    report: ReportSettings = Field(default_factory=ReportSettings)

    def resolved_database_url(self) -> str:
        return self.database_url.get_secret_value() or f"sqlite:///{(self.data_dir / 'teleread.db').resolve()}"

    def updated(self, **changes: Any) -> Settings:
        """A copy with ``changes``; ``grpc__port=1`` changes a nested setting (the copy is checked)."""
        data = self.model_dump()
        for key, value in changes.items():
            *path, last = key.split("__")
            node = data
            for part in path:
                node = node[part]
            node[last] = value
        return type(self).model_validate(data)

    def staging_dir(self) -> Path:
        return self.data_dir / "staging"

    def object_root(self) -> Path:
        return self.storage.root or (self.data_dir / "objects")


def build(**options: Any) -> Settings:
    """The settings: ``TELEREAD_*`` variables, overridden by the command line's ``options``
    (``None`` means not given; ``grpc__port`` names a nested setting)."""
    init: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        *path, last = key.split("__")
        node = init
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return Settings(**init)


class ClientSettings(BaseSettings):
    """What the command-line clients (upload, read, results) read: the hub and the caller's token."""

    model_config = SettingsConfigDict(env_prefix="TELEREAD_", extra="ignore", frozen=True)

    hub: str = ""
    token: SecretStr = SecretStr("")
    session_file: Path | None = None  # where `teleread login` keeps the session; default ~/.config/teleread/
