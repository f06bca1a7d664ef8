"""Settings: one table that the library, the TOML file, the environment and the flags share.

Precedence, highest first: command-line flags, the ``--config`` TOML file,
``WQSUPERVISOR_*`` environment variables, the defaults below. Every setting is
declared once, with its help text, so the three sources cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backoff import Backoff, RestartPolicy
from .errors import ConfigError
from .rules import RULES
from .target import SshTarget

ENV_PREFIX = "WQSUPERVISOR_"


def _setting(default: Any, help: str, *, metavar: str | None = None, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar, "cli": cli})


@dataclass(frozen=True)
class Settings:
    """Everything a supervisor can be told. Build with :func:`resolve` or keyword arguments."""

    via: str | None = _setting(
        None,
        "the head node to tunnel through, [USER@]HOST or an alias from ~/.ssh/config",
        metavar="[USER@]HOST",
    )
    also_via: tuple[str, ...] = _setting(
        (),
        "another head node of the same cluster, for when the tunnel cannot be kept on the first "
        "(repeatable, tried in order; giving --via again does the same)",
        metavar="[USER@]HOST",
    )
    remote_port: int | None = _setting(
        None,
        "port to open on the head node's loopback for workers (0: the head picks one, once)",
        metavar="N",
    )
    ssh_port: int | None = _setting(None, "sshd port on the head node (default: ssh's own)", metavar="N")
    identity: str | None = _setting(None, "private key file for ssh (ssh -i)", metavar="FILE")
    ssh_options: tuple[tuple[str, str], ...] = _setting(
        (), "extra ssh option, passed as -o KEY=VALUE (repeatable)", metavar="KEY=VALUE"
    )
    ssh_config: str | None = _setting(
        None, "ssh client config file to use instead of ~/.ssh/config (ssh -F)", metavar="FILE"
    )
    ssh_program: str = _setting("ssh", "the OpenSSH client to run", metavar="PATH")
    remote_bind: str = _setting(
        "127.0.0.1",
        "address the head node binds the remote port to (anything but loopback is exposed)",
        metavar="ADDR",
    )
    backend: str = _setting("openssh", "tunnel backend: openssh, resumable or paramiko", metavar="NAME")
    resume: bool = _setting(
        True,
        "resumable forwarding with the openssh backend: a relay on the head node (its python3) holds "
        "the workers' connections while the tunnel restarts (plain forwarding where the head has no "
        "usable Python)",
    )
    relay_linger: float = _setting(
        900.0,
        "seconds the head relay waits for the supervisor to come back before it closes its workers' "
        "connections and exits",
        metavar="S",
    )
    relay_python: str = _setting(
        "python3", "the head node's Python (3.6 or later) for the relay", metavar="PATH"
    )
    resume_hop: bool = _setting(
        False,
        "the compute nodes' hops resume too: a relay on the node (its python3) holds the worker's "
        "connection while the hop's ssh restarts (a plain hop where the node or the head has no "
        "usable Python, or for TaskVine)",
    )
    node_python: str = _setting(
        "python3", "the compute nodes' Python (3.6 or later) for the node relay (resume_hop)", metavar="PATH"
    )
    own_socket: bool = _setting(
        True,
        "open the TCP connection ourselves and hand it to ssh (retransmission cap, TCP_INFO); "
        "off automatically with ProxyJump/ProxyCommand",
    )
    password_file: str | None = _setting(
        None,
        "Work Queue password file for master, workers and probes (created if missing; 'auto')",
        metavar="FILE",
    )
    allow_no_password: bool = _setting(False, "allow a tunnel for a master that has no password")
    ssl: bool = _setting(
        False,
        "the master uses SSL (ssl=(key, cert)): probes speak TLS, workers get --ssl (found by itself "
        "on ndcctools masters)",
    )
    metrics_port: int | None = _setting(
        None, "serve Prometheus metrics on this port (127.0.0.1 unless --metrics-host)", metavar="N"
    )
    metrics_host: str = _setting(
        "127.0.0.1", "address for --metrics-port (anything else exposes it)", metavar="ADDR"
    )
    keepalive_interval: float = _setting(
        1.0, "seconds between round trips through the ssh session", metavar="S"
    )
    stall_after: float = _setting(3.0, "seconds of silence before the session counts as stalled", metavar="S")
    master_timeout: int = _setting(
        120,
        "seconds the master waits for a worker's reply before dropping it (Work Queue's short-timeout, "
        "5 s of its own, too short for a tunnel that stalls and resumes); 0: leave the master's own",
        metavar="S",
    )
    probe_interval: float = _setting(
        2.0, "seconds between checks that the remote port reaches the master", metavar="S"
    )
    stats_interval: float = _setting(1.0, "seconds between samples of the master's stats", metavar="S")
    connect_timeout: float = _setting(
        15.0, "seconds an ssh start may take before it counts as failed", metavar="S"
    )
    start_attempts: int = _setting(
        5, "failed starts before a tunnel that was never up gives up (0: never)", metavar="N"
    )
    stable_after: float = _setting(5.0, "seconds up after which a drop is restarted at once", metavar="S")
    backoff_initial: float = _setting(0.5, "first restart delay after a failed start", metavar="S")
    backoff_cap: float = _setting(20.0, "longest delay between restarts", metavar="S")
    log_format: str = _setting("console", "log lines as console text or json", metavar="FORMAT")

    # -- starting workers -------------------------------------------------------------
    workers: str | None = _setting(
        None,
        "start workers with: local, ssh (on the head node), slurm, condor, pbs, torque, sge, factory",
        metavar="SYSTEM",
    )
    min_workers: int = _setting(0, "workers to keep even without work", metavar="N")
    max_workers: int = _setting(4, "most workers at once, jobs on their way included", metavar="N")
    tasks_per_worker: int = _setting(1, "backlog tasks that call for one more worker", metavar="N")
    max_pending: int = _setting(4, "most jobs submitted but not yet connected", metavar="N")
    max_per_cycle: int = _setting(2, "most jobs submitted at once", metavar="N")
    scale_cooldown: float = _setting(10.0, "seconds between two submissions", metavar="S")
    idle_time: float = _setting(60.0, "seconds without work before a worker leaves (scale-in)", metavar="S")
    factory_type: str = _setting(
        "local",
        "with --workers factory: the factory's own batch type (local, slurm, condor...)",
        metavar="TYPE",
    )
    factory_program: str | None = _setting(
        None,
        "with --workers factory: the factory program on the head node (default: the master's own kind "
        "of factory: work_queue_factory, or vine_factory for a TaskVine manager)",
        metavar="PATH",
    )
    worker_cores: int = _setting(1, "cores each worker offers and each job asks for", metavar="N")
    worker_memory: int | None = _setting(None, "memory per worker in MB", metavar="MB")
    worker_disk: int | None = _setting(None, "disk per worker in MB", metavar="MB")
    worker_program: str | None = _setting(
        None,
        "the worker program on the nodes (default: the master's own kind of worker: work_queue_worker, "
        "or vine_worker for a TaskVine manager)",
        metavar="PATH",
    )
    node_via: str | None = _setting(
        None,
        "how compute nodes reach the head node for their hop (default: its own hostname)",
        metavar="[USER@]HOST",
    )
    also_node_via: tuple[str, ...] = _setting(
        (),
        "how compute nodes reach each of the other head nodes, in the order of --also-via "
        "(default: their own hostnames; giving --node-via again does the same)",
        metavar="[USER@]HOST",
    )
    node_ssh_args: str | None = _setting(
        None, "extra ssh arguments for the compute nodes' hop", metavar="ARGS"
    )
    partition: str | None = _setting(None, "batch partition or queue", metavar="NAME")
    account: str | None = _setting(None, "batch account or project", metavar="NAME")
    walltime: str | None = _setting(None, "batch wall time per worker job, HH:MM:SS", metavar="TIME")
    batch_directives: tuple[str, ...] = _setting(
        (), "extra line for the job script header, as it is (repeatable)", metavar="LINE"
    )
    batch_env: tuple[tuple[str, str], ...] = _setting(
        (), "environment for the batch commands on the head node, KEY=VALUE (repeatable)", metavar="KEY=VALUE"
    )

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def restart_policy(self) -> RestartPolicy:
        """The restart decision's settings."""
        return RestartPolicy(
            backoff=Backoff(initial=self.backoff_initial, cap=self.backoff_cap),
            start_attempts=self.start_attempts,
            stable_after=self.stable_after,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping that :func:`resolve` reads back."""
        data = dataclasses.asdict(self)
        for f in setting_fields():
            if _is_pairs(f):
                data[f.name] = [f"{k}={v}" for k, v in getattr(self, f.name)]
            elif _is_strings(f):
                data[f.name] = list(getattr(self, f.name))
        return data

    @property
    def scaling(self) -> Any:
        """The scaling policy's settings."""
        from .policy import ScalingSettings

        return ScalingSettings(
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            tasks_per_worker=self.tasks_per_worker,
            max_pending=self.max_pending,
            max_per_cycle=self.max_per_cycle,
            cooldown=self.scale_cooldown,
            idle_time=self.idle_time,
        )

    def ssh_target(self) -> SshTarget:
        """The head node and how to reach it, for the transports, head-node commands and batch runners."""
        self.require_via()
        assert self.via is not None
        return SshTarget(
            destination=self.via,
            port=self.ssh_port,
            identity=self.identity,
            options=self.ssh_options,
            config_file=self.ssh_config,
            connect_timeout=self.connect_timeout,
            bind=self.remote_bind,
            program=self.ssh_program,
            keepalive=self.keepalive_interval,
        )

    def ssh_targets(self) -> list[SshTarget]:
        """Every head node, in the order they are tried: :attr:`via`, then :attr:`also_via`."""
        first = self.ssh_target()
        return [first, *(dataclasses.replace(first, destination=other) for other in self.also_via)]

    def require_via(self) -> None:
        """Raise unless the settings name a head node."""
        if not self.via:
            raise ConfigError(
                "no head node given",
                "pass via='user@headnode' (--via on the command line, or WQSUPERVISOR_VIA)",
            )

    def require_tunnel(self) -> None:
        """Raise unless the settings name a head node and a remote port."""
        self.require_via()
        if self.remote_port is None:
            raise ConfigError(
                "no remote port given",
                "pass remote_port=N, a free port on the head node such as 10001 (--remote-port)",
            )


# Settings that take several values in a list (or a repeated flag): the first stays in the
# setting, the others go to its companion, as though they had been given there.
SPREAD = {"via": "also_via", "node_via": "also_node_via"}


def spread(found: Mapping[str, Any]) -> dict[str, Any]:
    """``via = ["a", "b"]`` as ``via = "a"`` and ``also_via = ["b", ...]`` (before any of its own)."""
    out = dict(found)
    for name, companion in SPREAD.items():
        value = out.get(name)
        if isinstance(value, list | tuple):
            if not value:
                out[name] = None
                continue
            first, *others = value
            out[name] = first
            given = out.get(companion) or ()
            if isinstance(given, str):
                given = [given]
            out[companion] = [*others, *given]
    return out


def _spread_key(key: str) -> str:
    name = key.replace("-", "_")
    return name if name in SPREAD else key


def setting_fields() -> list[dataclasses.Field[Any]]:
    """The declared settings, in order."""
    return list(dataclasses.fields(Settings))


def check_setting(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a valid value of the setting ``name``."""
    RULES[name](name, value)


def _validate(s: Settings) -> None:
    """Every setting's rule, then the rules between settings."""
    for f in setting_fields():
        check_setting(f.name, getattr(s, f.name))
    if s.backoff_initial > s.backoff_cap:
        raise ConfigError(
            f"backoff_initial {s.backoff_initial} is longer than backoff_cap {s.backoff_cap}",
            "make the first delay no longer than the longest",
        )
    if s.also_via and s.remote_port == 0:
        raise ConfigError(
            "remote_port 0 (the head picks) cannot work with several head nodes",
            "give a fixed --remote-port that is free on every head node: the workers use the same one",
        )
    if s.also_via and not s.via:
        raise ConfigError("also_via without via", "name the first head node with --via")
    try:
        s.scaling  # noqa: B018 - validates the limits
    except ValueError as exc:
        raise ConfigError(f"worker limits: {exc}", "check --min-workers/--max-workers") from None


def parse_ssh_option(text: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` (or ssh's own ``KEY VALUE``) into a pair."""
    key, sep, value = text.partition("=")
    if not sep:
        key, _, value = text.strip().partition(" ")
    key, value = key.strip(), value.strip()
    if not key or not value:
        raise ConfigError(f"ssh option {text!r} is not KEY=VALUE", "e.g. --ssh-option ServerAliveInterval=15")
    return key, value


def parse_env_pair(text: str) -> tuple[str, str]:
    """Split ``KEY=VALUE`` of ``batch_env`` into a pair (the value may be empty, the name may not)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"batch_env {text!r} is not KEY=VALUE", "e.g. --batch-env SLURM_CONF=/etc/slurm/slurm.conf"
        )
    return key, value


def _is_pairs(f: dataclasses.Field[Any]) -> bool:
    return str(f.type).startswith("tuple[tuple[str, str]")


def _is_strings(f: dataclasses.Field[Any]) -> bool:
    return str(f.type) == "tuple[str, ...]"


def _pair(f: dataclasses.Field[Any], item: Any) -> tuple[str, str]:
    if isinstance(item, list | tuple) and len(item) == 2:
        return (item[0], item[1])
    if not isinstance(item, str):
        raise TypeError(item)
    return parse_env_pair(item) if f.name == "batch_env" else parse_ssh_option(item)


def _convert(f: dataclasses.Field[Any], value: Any) -> Any:
    kind = str(f.type)
    if _is_pairs(f):
        if isinstance(value, Mapping):
            return tuple((str(k), str(v)) for k, v in value.items())
        if isinstance(value, str):
            value = [p for p in value.replace("\n", ";").split(";") if p.strip()]
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        return tuple(_pair(f, item) for item in value)
    if _is_strings(f):
        if isinstance(value, str):
            value = [p for p in value.split("\n") if p.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise TypeError(value)
        return tuple(value)
    if value is None:
        return None
    if kind.startswith("bool"):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if not isinstance(value, bool | int):
            raise TypeError(value)
        return bool(value)
    if kind.startswith("int"):
        # A float, even 10001.0, is refused: a port or a count written as one is a slip.
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError(value)
        return int(value)
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError(value)
        return float(value)
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise TypeError(value)
    return str(value)


def _coerce(f: dataclasses.Field[Any], value: Any, origin: str, *, name_origin: bool = True) -> Any:
    """``value`` from ``origin`` as the setting's type, checked by its rule; errors name the origin
    (a broken rule's, only with ``name_origin``: a keyword argument needs no "where")."""
    try:
        converted = _convert(f, value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{origin}: {f.name} = {value!r} is not a valid {str(f.type).split(' ', maxsplit=1)[0]}",
            "see 'python -m wqsupervisor run --help'",
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc.message}", exc.hint) from None
    try:
        check_setting(f.name, converted)
    except ConfigError as exc:
        if not name_origin:
            raise
        raise ConfigError(f"{origin}: {exc.message}", exc.hint) from None
    return converted


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings found in ``WQSUPERVISOR_*`` variables."""
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for f in setting_fields():
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            found[f.name] = _coerce(f, env[key], key)
    return found


def from_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings found in a TOML file (``remote-port`` and ``remote_port`` both work)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist", "check the path given to --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory", "give the path of a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}", "check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {exc.start})", "save it as UTF-8, as TOML requires"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}", "see https://toml.io") from None
    table = data.get("wqsupervisor", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{p}: [wqsupervisor] is not a table", "write the settings under [wqsupervisor]")
    # node-via and node_via alike, so that a list of either spreads.
    table = spread({_spread_key(k): v for k, v in table.items()})
    known = {f.name: f for f in setting_fields()}
    found: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        key = {"ssh_option": "ssh_options", "batch_directive": "batch_directives"}.get(key, key)
        if key not in known:
            if isinstance(value, dict):
                continue  # a section of a later feature
            raise ConfigError(f"{p}: unknown setting {raw_key!r}", "see 'python -m wqsupervisor run --help'")
        found[key] = _coerce(known[key], value, str(p))
    return found


def resolve(
    flags: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Settings | None = None,
) -> Settings:
    """Merge the sources: flags over the file over the environment over ``base``."""
    merged: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
    merged.update(from_environment(environ))
    if config_file is not None:
        merged.update(from_toml(config_file))
    known = {f.name: f for f in setting_fields()}
    for key, value in spread(flags or {}).items():
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}", f"known settings: {', '.join(known)}")
        merged[key] = _coerce(known[key], value, "command line")
    for f in setting_fields():
        if _is_pairs(f) and f.name in merged:
            merged[f.name] = tuple(tuple(p) for p in merged[f.name])
        elif _is_strings(f) and f.name in merged:
            merged[f.name] = tuple(merged[f.name])
    return Settings(**merged)


def settings_from_kwargs(kwargs: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Library keyword arguments over ``base`` (the environment is not read here)."""
    known = {f.name: f for f in setting_fields()}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}", f"known settings: {', '.join(known)}")
    data: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
    for key, value in spread(kwargs).items():
        given = tuple(value.items()) if _is_pairs(known[key]) and isinstance(value, Mapping) else value
        data[key] = _coerce(known[key], given, "argument", name_origin=False) if given is not None else None
    return Settings(**data)


def names() -> Iterable[str]:
    """Every setting name."""
    return (f.name for f in setting_fields())
