"""`edgeglm fleet ...`: the controller's commands.

    edgeglm fleet serve [--broker HOST:PORT] [--db fleet.db] [--fleet F]
    edgeglm fleet status [--db fleet.db] [--fleet F] [--json]
    edgeglm fleet offer --fleet F --device D --bundle BUNDLE [--force] [--broker HOST:PORT] [--db fleet.db]
    edgeglm fleet config set (--fleet F --device D | --group G) KEY=VALUE... [--broker HOST:PORT]
    edgeglm fleet rollout --bundle B --group G --canary PCT [--max-p95-regression PCT] [--window S]
                          [--min-requests N] [--min-free-memory-mb MB] [--previous-bundle P [--key ROLLBACK_KEY]]
                          [--db fleet.db]
    edgeglm fleet rollout cancel ID [--db fleet.db]
    edgeglm fleet rollback --group G [--to VERSION] [--key ROLLBACK_KEY] [--valid-for SECONDS]
                           [--broker HOST:PORT] [--db fleet.db]
    edgeglm fleet group add|remove G [--fleet F] DEVICE... (add: [--force])  /  edgeglm fleet group list
    edgeglm fleet device remove --fleet F DEVICE... [--force] [--broker HOST:PORT] [--db fleet.db]

`serve` runs until SIGTERM/Ctrl-C and advances the rollouts in its database every second;
`rollout` only records a rollout there (after checking its bundles, key, target and numbers), and
`rollout cancel` stops one there. A group G is an assigned group (`group add`), or a fleet
id when no group G is assigned (fleet/groups.py). `offer`, `rollback` and `config set` publish
through a short-lived connection; the serving controller answers the chunk requests of an offer
from the shared database. Rollback offers are signed with --key, or with `[rollback] key` of the
fleet config (fleet/config.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from agent.errors import AgentError


class FleetError(AgentError):
    """A fleet command cannot do what was asked."""


def _broker(value: str) -> tuple[str, int]:
    """HOST:PORT, or mqtt://HOST:PORT as `edgeglm demo --broker` takes it."""
    rest = value[len("mqtt://"):] if value.lower().startswith("mqtt://") else value
    if "://" in rest:  # mqtts:// and the like: TLS is configured in [mqtt.tls], not by a scheme
        raise FleetError(f"--broker {value!r}: give HOST:PORT (or mqtt://HOST:PORT); for TLS set [mqtt.tls] ca_file "
                         "in --config fleet.toml")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise FleetError(f"--broker {value!r} is not HOST:PORT (e.g. 127.0.0.1:1883)")
    return host, int(port)


def _check_ids(fleet: str | None = None, devices=()) -> None:
    """FleetError unless the fleet and device ids can be MQTT topic levels (what agents accept as ids)."""
    from agent.topics import _level

    try:
        if fleet is not None and fleet != "+":
            _level(fleet, "fleet id")
        for device in devices:
            _level(device, "device id")
    except ValueError as exc:
        raise FleetError(str(exc)) from None


def _settings(args):
    from fleet.config import load_fleet_config, mqtt_password
    from fleet.controller import ControllerSettings

    _check_ids(getattr(args, "fleet", None), [args.device] if getattr(args, "device", None) else [])
    overrides: dict = {}
    if args.broker:
        host, port = _broker(args.broker)
        overrides["mqtt"] = {"host": host, "port": port}
    if args.db:
        overrides["database"] = {"path": args.db}
    if getattr(args, "fleet", None) and getattr(args, "fleet_command", None) == "serve":
        overrides["fleet"] = {"id": args.fleet}
    cfg = load_fleet_config(getattr(args, "config", None), overrides)
    m, serving = cfg.mqtt, getattr(args, "fleet_command", None) == "serve"
    settings = ControllerSettings(
        broker_host=m.host, broker_port=m.port, db=cfg.database.path, fleet=cfg.fleet.id,
        # a command's own client id: two at once must not take each other's session over. A broker with
        # use_username_as_clientid (the K3s one) replaces it by the username, so there a command needs a user of
        # its own, not the serving controller's (k3s/base/core/controller.yaml, fleet-cli.toml)
        client_id=_serve_client_id(m, cfg.fleet.id) if serving else f"{m.client_id}-cli-{os.getpid()}", listen=serving,
        username=m.username, password=mqtt_password(m),  # a ConfigError if [mqtt] password_file cannot be read
        ca_file=m.tls.ca_file if m.tls else None, protocol=m.protocol, retention_s=cfg.database.retention_s,
        silent_after_s=cfg.fleet.silent_after_s, telemetry_qos=m.telemetry_qos, session_expiry_s=m.session_expiry_s,
        receive_maximum=m.receive_maximum)
    return cfg, settings


def _serve_client_id(mqtt, fleet: str | None) -> str:
    """`fleet serve`'s MQTT client id: [mqtt] client_id where set, else the default with the fleet served
    (`--fleet`): per-fleet controllers on one broker under the one default id took each other's session over,
    each reconnecting every second."""
    if "client_id" in mqtt.model_fields_set or not fleet or fleet == "+":  # (every fleet: "+" is no id part)
        return mqtt.client_id
    return f"{mqtt.client_id}-{fleet}"


def ipaddress_is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; any other name or address (0.0.0.0, ::) is reachable."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _some_of(known: list[str], wanted: str, shown: int = 5) -> str:
    """The registered ids worth showing for a mistyped `wanted`: all of a small fleet, else the closest few and a
    count (every id of a fleet of 10,000 went into one line)."""
    if len(known) <= shown:
        return ", ".join(known) or "none"
    import difflib
    close = difflib.get_close_matches(wanted, known, n=shown, cutoff=0.6)
    return (f"{len(known)} registered; closest: {', '.join(close)}" if close else
            f"{len(known)} registered, none close to {wanted!r}") + " (`edgeglm fleet status` lists them)"


def _check_http_port(host: str, port: int) -> None:
    """FleetError where `fleet serve` could not serve HTTP on host:port, found before it connects to the broker:
    connected first, a second controller took the running one's MQTT session over and only then failed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    try:
        ThreadingHTTPServer((host, port), BaseHTTPRequestHandler).server_close()  # bound as serve_http binds
    except OSError as exc:
        raise FleetError(f"cannot serve HTTP on {host}:{port} ({exc.strerror or exc}); choose another --http-port "
                         "or [http] port; the controller did not start") from None


def _lost(exc: ConnectionError, done: list[str], total: int, what: str, again: str) -> FleetError:
    """A command's publishing cut by the broker going away: one line saying what was published, not a traceback."""
    published = f"{len(done)} of {total} {what} before ({', '.join(done)})" if done else f"none of {total} {what}"
    return FleetError(f"{exc}; {published}; {again}")


def _connect(args, serving: bool = False):
    from fleet.controller import FleetController

    _, settings = _settings(args)
    try:
        return FleetController(settings).start()
    except ConnectionError as exc:
        where = "--broker" if getattr(args, "broker", None) else \
            "--broker HOST:PORT (or [mqtt] host/port in --config fleet.toml)"
        if serving:  # `fleet serve` itself: it is the one that uses the broker
            raise FleetError(f"{exc}; the controller did not start: is the broker up? give its address with "
                             f"{where}") from None
        raise FleetError(f"{exc}; nothing was published: is the broker that `fleet serve` uses up? give its address "
                         f"with {where}") from None


def cmd_serve(args) -> int:
    from fleet.controller import read_metrics_token, serve_http

    cfg, _ = _settings(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # before connecting: a bad token file stops the start, not a scrape later
        token = read_metrics_token(cfg.http.metrics_token_file) if cfg.http.metrics_token_file else None
    except ValueError as exc:
        raise FleetError(f"{exc}; the controller did not start") from None
    port = args.http_port if args.http_port is not None else cfg.http.port
    if not 0 <= port <= 65535:
        raise FleetError(f"--http-port {port} is not a port number (0-65535; 0 picks a free one)")
    _check_http_port(cfg.http.host, port)
    controller = _connect(args, serving=True)
    if token is None and not ipaddress_is_loopback(cfg.http.host):
        logging.getLogger("edgeglm.fleet").warning(
            "HTTP on %s:%d without a metrics token: anyone who reaches it reads /metrics (fleet ids, versions, "
            "latencies); set [http] metrics_token_file, or bind 127.0.0.1", cfg.http.host, port)
    try:
        http = serve_http(controller, cfg.http.host, port, metrics_token=token)
    except OSError as exc:
        controller.stop()
        raise FleetError(f"cannot serve HTTP on {cfg.http.host}:{port} ({exc.strerror or exc}); choose another "
                         "--http-port or [http] port") from None
    stop, hangup = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hangup.set())  # it ended the controller uncleanly (a closed terminal)
    from fleet.rollout import RolloutDriver

    driver = RolloutDriver(controller.store, controller, fleet=controller.settings.fleet, stopping=stop)
    print(f"fleet controller: broker {controller.settings.broker_host}:{controller.settings.broker_port}, "
          f"database {controller.settings.db}, http {cfg.http.host}:{http.server_address[1]}; Ctrl-C stops",
          flush=True)
    while not stop.wait(1.0):
        if hangup.is_set():
            hangup.clear()
            cfg = _reload(args, cfg, controller, http)
        try:
            driver.tick()  # one rollout's failing step is logged by tick; this catches the rest (the database)
        except Exception:
            logging.getLogger("edgeglm.fleet").exception("rollout tick failed; trying again in 1 s")
    logging.getLogger("edgeglm.fleet").info("stopping: the telemetry received is written, then the controller ends")
    http.shutdown()
    controller.stop()
    return 0


LIVE_SETTINGS = ("log_level", "database.retention_s", "http.metrics_token_file")


def _reload(args, cfg, controller, http):
    """SIGHUP (`systemctl reload`, a changed ConfigMap): read fleet.toml again and apply what can change while
    serving (LIVE_SETTINGS); the rest keeps its running value until a restart, and the log names it. A file
    that no longer loads, or a metrics token file that cannot be read, changes nothing. The config now running."""
    from fleet.controller import read_metrics_token

    log = logging.getLogger("edgeglm.fleet")
    try:
        new, _ = _settings(args)
        token = read_metrics_token(new.http.metrics_token_file) if new.http.metrics_token_file else None
    except (AgentError, ValueError, OSError) as exc:
        log.warning("SIGHUP: fleet.toml not applied, the running config is kept: %s", exc)
        return cfg
    old_flat, new_flat = _flat(cfg.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    changed = sorted(k for k in set(old_flat) | set(new_flat) if old_flat.get(k) != new_flat.get(k))
    logging.getLogger().setLevel(new.log_level.upper())
    controller.store.retention_s = controller.settings.retention_s = new.database.retention_s
    http.set_metrics_token(token)  # read again even under the same path: a token rotated in its file
    log.info("SIGHUP: %s; %s%s", f"{args.config} read again" if getattr(args, "config", None) else
             "no --config file: the environment (EDGEGLM_*) read again",
             "applied: " + ", ".join(k for k in changed if k in LIVE_SETTINGS)
             if any(k in LIVE_SETTINGS for k in changed) else "no live setting changed",
             "; the metrics token file was read again" if new.http.metrics_token_file else "")
    waiting = [k for k in changed if k not in LIVE_SETTINGS]
    if waiting:
        log.warning("SIGHUP: %s changed in fleet.toml: applied at the next restart of fleet serve (the running "
                    "value is kept)", ", ".join(waiting))
    return _keep(cfg, new)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _keep(running, new):
    """`running` with the live settings of `new`: what the controller now runs."""
    return running.model_copy(update={
        "log_level": new.log_level,
        "database": running.database.model_copy(update={"retention_s": new.database.retention_s}),
        "http": running.http.model_copy(update={"metrics_token_file": new.http.metrics_token_file})})


def _db(args) -> Path:
    from fleet.config import load_fleet_config

    cfg = load_fleet_config(args.config)  # a given --config is always read and checked, --db or not
    db = Path(args.db) if args.db else cfg.database.path
    if db.is_dir():  # else "no fleet database; is `fleet serve --db DIR` running?", which it cannot be
        raise FleetError(f"fleet database {db} (--db or database.path) cannot be opened: it is a directory; give "
                         f"the database file, e.g. --db {db / 'fleet.db'}; nothing was done")
    return db


def _rollback_key(args, signs: str) -> Path:
    """The private key that signs rollback offers: --key, else `[rollback] key` of the fleet config; checked."""
    from fleet.config import load_fleet_config
    from ota.signing import SignatureError, load_private_key

    if args.key is not None:
        key, where = Path(args.key), "--key"
    else:
        key, where = load_fleet_config(args.config).rollback.key, "[rollback] key"
        if key is None:
            raise FleetError(f"no key to sign {signs}: give --key ROLLBACK_KEY or set [rollback] key in the fleet "
                             f"config (EDGEGLM_ROLLBACK__KEY); nothing was done")
    if not key.is_file():
        raise FleetError(f"{where} {key}: no such file (the private key that signs {signs}); nothing was done")
    try:
        load_private_key(key)
    except SignatureError as exc:
        raise FleetError(f"{where}: {exc}; nothing was done") from None
    return key


def _store(args, db: Path, read_only: bool = False):
    """The fleet database at `db`, read with the fleet config's `[fleet] silent_after_s`."""
    from fleet.config import load_fleet_config
    from fleet.store import Store

    store = Store(db, read_only=read_only)
    store.silent_after_s = load_fleet_config(args.config).fleet.silent_after_s
    return store


def _existing_db(args) -> Path:
    db = _db(args)
    if not db.is_file():
        raise FleetError(f"{db}: no fleet database; is `edgeglm fleet serve --db {db}` running?")
    return db


def cmd_status(args) -> int:
    import math

    from fleet.controller import format_status

    if not (math.isfinite(args.since) and args.since > 0):
        raise FleetError(f"--since {args.since:g}: must be a positive number of seconds (the telemetry window "
                         f"of the latency columns, default 3600)")
    _check_ids(args.fleet)  # a fleet id no device can have listed nothing and said nothing
    store = _store(args, _existing_db(args), read_only=True)  # (a user who may only read the database)
    if args.json:
        import time

        since = time.time() - args.since
        from fleet.controller import health_current

        from fleet.controller import signing_key_summary

        results, health = store.last_results(args.fleet), store.health(args.fleet)
        keys = store.signing_keys(args.fleet)
        losses = store.telemetry_losses(args.fleet, since)
        no_loss = {"lost_reports": 0, "missing_gaps": 0, "missing_s": 0.0}
        devices = [{**d, "online": bool(d["online"]), **losses.get((d["fleet"], d["device"]), no_loss),
                    "latency": store.latency(d["fleet"], d["device"], since, d["model_version"]),
                    "last_update": results.get((d["fleet"], d["device"])),
                    "health": health.get((d["fleet"], d["device"])),
                    "health_current": bool(d["online"]) and health_current(health.get((d["fleet"], d["device"]))),
                    "keys": keys.get((d["fleet"], d["device"]))}
                   for d in store.devices(args.fleet)]  # the table's latency columns, on the model it serves
        from fleet.rollout import load_rollouts

        rollouts = [{"id": r.id, "bundle": str(r.bundle), "version": r.data.get("version"), "fleet": r.fleet,
                     "group": r.group, "phase": r.phase, "halt_reason": r.data.get("halt_reason"),
                     "step_error": r.data.get("step_error"), "report": r.data.get("report", [])}
                    for r in load_rollouts(store) if args.fleet in (None, "+", r.fleet)]
        print(json.dumps({"devices": devices, "versions": store.versions(args.fleet, since), "rollouts": rollouts,
                          "signing_keys": signing_key_summary(keys)}, indent=2))
    else:
        print(format_status(store, args.fleet, args.since))
    return 0


def cmd_offer(args) -> int:
    from fleet.controller import offerable_bundle

    bundle = offerable_bundle(args.bundle)  # before anything is published
    _, settings = _settings(args)
    db, device = settings.db, f"{args.fleet}/{args.device}"
    if Path(db).is_file():
        store = _store(args, db)
        known = [d["device"] for d in store.devices(args.fleet)]
        store.close()
        problem = None if args.device in known else \
            f"device {args.device} has never reported to the registry {db} (devices of fleet {args.fleet}: " \
            f"{_some_of(known, args.device)})"
    else:
        problem = f"there is no fleet database at {db}, so no device has reported"
    if Path(db).is_file():
        _refuse_another_build(args, db, bundle, "nothing was offered")
    if problem and not args.force:
        raise FleetError(f"--device {device}: {problem}; nothing was offered. Check --fleet/--device (and --db), "
                         f"or give --force to publish the retained offer, which the device gets when it connects")
    if problem:
        print(f"edgeglm fleet offer: warning: --device {device}: {problem}; the retained offer waits for it (--force)",
              file=sys.stderr)
    controller = _connect(args)
    try:
        update_id = controller.offer(args.fleet, args.device, Path(args.bundle))
    except ConnectionError as exc:
        raise _lost(exc, [], 1, "offer published", "run the same command again") from None
    finally:
        controller.stop()
    print(f"offered {args.bundle} to {device} as update {update_id}")
    _warn_targets(db, [(args.fleet, args.device)], bundle)
    return 0


def _refuse_another_build(args, db, bundle, nothing: str) -> None:
    """A bundle exported again at a version already offered with other contents: the devices that took the first
    build count as on that version, so a rollout skips them and the fleet runs two builds under one version, with
    nothing to tell them apart. Refused unless --force."""
    store = _store(args, db)
    try:
        earlier = store.other_builds(bundle.manifest.name, bundle.manifest.version, bundle.sha256)
    finally:
        store.close()
    if not earlier:
        return
    what = f"{bundle.manifest.name} {bundle.manifest.version}"
    line = (f"--bundle {args.bundle} is {what}, but another build of {what} was offered before (update "
            f"{earlier[-1][0]}, manifest sha256 {earlier[-1][1][:12]}..., not {bundle.sha256[:12]}...): devices that "
            f"took it report {bundle.manifest.version} and are not offered this one, and the fleet would run two "
            f"builds under one version")
    if not args.force:
        raise FleetError(f"{line}; export this build at a new version (e.g. `[export] version` in the recipe, or "
                         f"`edgeglm export --version`); {nothing} (--force offers it anyway)")
    print(f"edgeglm fleet: warning: {line} (--force)", file=sys.stderr)


def _warn_targets(db, targets: list[tuple[str, str]], bundle) -> None:
    """Say which targets will refuse `bundle` (checked and opened by the caller: its files are not read again):
    too little free disk in their latest health snapshot, or an agent older than the bundle needs."""
    from fleet.controller import agents_too_old, bundle_bytes, short_of_disk
    from fleet.store import Store

    if not Path(db).is_file():
        return
    store = Store(db)
    try:
        for line in short_of_disk(store, targets, bundle_bytes(bundle)) + \
                agents_too_old(store, targets, bundle.manifest.min_agent_version):
            print(f"edgeglm fleet: warning: {line}", file=sys.stderr)
    finally:
        store.close()


WINDOW_MAX_S = 7 * 86400.0  # the longest `rollout --window`: a rollout waits up to four windows for results


def _check_number(flag: str, value: float, ok: bool, allowed: str, nothing: str = "recorded") -> None:
    import math

    if not (math.isfinite(value) and ok):
        raise FleetError(f"{flag} {value:g}: must be {allowed}; nothing was {nothing}")


def cmd_rollout(args) -> int:
    if args.action == "cancel":
        return _rollout_cancel(args)
    if args.action is not None or args.rollout_id is not None:
        raise FleetError(f"rollout {' '.join(str(x) for x in (args.action, args.rollout_id) if x is not None)}: "
                         f"not understood; `edgeglm fleet rollout --bundle B --group G --canary PCT` starts one, "
                         f"`edgeglm fleet rollout cancel ID` stops one")
    missing = [flag for flag, v in (("--bundle", args.bundle), ("--group", args.group), ("--canary", args.canary))
               if v is None]
    if missing:
        raise FleetError(f"rollout needs {', '.join(missing)} (e.g. `edgeglm fleet rollout --bundle v2/ --group "
                         f"plant7 --canary 10`), or `rollout cancel ID`")
    return _rollout_start(args)


def _rollout_start(args) -> int:
    from fleet.controller import offerable_bundle
    from fleet.groups import one_fleet, select
    from fleet.rollout import create_rollout

    _check_number("--canary", args.canary, 0 < args.canary <= 100, "in (0, 100]: percent of the online devices")
    _check_number("--window", args.window, 0 < args.window <= WINDOW_MAX_S,
                  f"> 0 and <= {WINDOW_MAX_S:g} seconds (7 days) of canary telemetry")
    _check_number("--max-p95-regression", args.max_p95_regression, args.max_p95_regression >= 0,
                  ">= 0 percent of p95 growth that halts the rollout")
    _check_number("--min-delta-ms", args.min_delta_ms, args.min_delta_ms >= 0, ">= 0 ms")
    _check_number("--min-requests", args.min_requests, args.min_requests >= 1,
                  ">= 1 request per canary on each side of the update")
    if args.min_free_memory_mb is not None:
        _check_number("--min-free-memory-mb", args.min_free_memory_mb, args.min_free_memory_mb > 0,
                      "> 0 MiB a canary must still be able to take on the new version")
    if args.key is not None and args.previous_bundle is None:
        raise FleetError("--key signs the canaries' rollback offers to --previous-bundle: give --previous-bundle "
                         "too; nothing was recorded")
    key = _rollback_key(args, "the canaries' rollback offers") if args.previous_bundle else None
    # what the devices would be offered is checked now, as `fleet offer` checks it, not when the rollout runs
    bundle = offerable_bundle(args.bundle)
    if args.previous_bundle:
        from ota.versions import parse_version

        previous = offerable_bundle(args.previous_bundle).manifest.version
        if parse_version(previous) >= parse_version(bundle.manifest.version):
            # a signed rollback is taken as a downgrade whatever its version: "back" to a newer one would move the
            # canaries to a version nobody rolled out (--bundle and --previous-bundle swapped, say)
            raise FleetError(f"--previous-bundle {args.previous_bundle} is version {previous}, not older than "
                             f"--bundle {args.bundle} ({bundle.manifest.version}): the canaries' rollback only goes "
                             f"back; give the version they run now; nothing was recorded")
    db = _existing_db(args)
    _refuse_another_build(args, db, bundle, "nothing was recorded")
    store = _store(args, db)
    selection = select(store, args.group)  # an assigned group, or a fleet id with known devices
    fleet, group = (one_fleet(selection), args.group) if selection.assigned else (args.group, None)
    rid = create_rollout(store, Path(args.bundle), fleet, args.canary, args.max_p95_regression,
                         args.window, Path(args.previous_bundle) if args.previous_bundle else None,
                         key, args.min_delta_ms, group=group, min_free_mb=args.min_free_memory_mb,
                         min_requests=args.min_requests)
    print(f"rollout {rid}: {bundle.manifest.name} {bundle.manifest.version} to "
          f"{'group ' + group + ' of fleet ' + fleet if group else 'fleet ' + fleet} "
          f"({args.canary:g}% canary, gate +{args.max_p95_regression:g}% p95 over >= {args.min_requests} "
          f"request(s) per canary"
          f"{f', memory free >= {args.min_free_memory_mb:g} MiB' if args.min_free_memory_mb else ''}, "
          f"window {args.window:g} s); "
          f"`edgeglm fleet serve --db {db}` (of every fleet, or --fleet {fleet}) drives it, "
          f"`edgeglm fleet status` shows it, "
          f"`edgeglm fleet rollout cancel {rid}` stops it")
    store.close()
    _warn_targets(db, [m for m in selection.members if m[0] == fleet], bundle)
    return 0


def _rollout_cancel(args) -> int:
    from fleet.rollout import cancel_rollout

    if args.rollout_id is None:
        raise FleetError("rollout cancel needs the rollout's ID (`edgeglm fleet status` lists them)")
    given = [flag for flag, v in (("--bundle", args.bundle), ("--group", args.group), ("--canary", args.canary),
                                  ("--previous-bundle", args.previous_bundle), ("--key", args.key)) if v is not None]
    if given:
        raise FleetError(f"rollout cancel {args.rollout_id}: {', '.join(given)} not used by cancel; nothing was done")
    store = _store(args, _existing_db(args))
    r, was = cancel_rollout(store, args.rollout_id)
    offers = r.data.get("offers", {})
    results = {d: (store.last_result(r.fleet, d, u) or {}).get("result") for d, u in offers.items()}
    print(f"rollout {r.id} ({r.bundle.name} -> {r.target}) cancelled in phase {was}: no device is offered it "
          f"from now on, and no rollback is sent")
    for d, res in results.items():
        print(f"  {r.fleet}/{d}: {res or 'no result yet: its retained offer stands, the update may still complete'}")
    if results:
        print(f"{len(results)} device(s) were offered {r.bundle.name} before the cancel and keep what their update "
              f"gives; `edgeglm fleet rollback --group {r.group or r.fleet} --key KEY` takes them back")
    else:
        print("no device had been offered it")
    return 0


def cmd_config_set(args) -> int:
    from agent.config import canonical_settings
    from fleet.config import check_desired_config

    flat: dict = {}
    for item in args.pairs:
        key, sep, value = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise FleetError(f"{item!r} is not KEY=VALUE (e.g. sampling.max_tokens=128)")
        try:
            flat[key] = json.loads(value)
        except json.JSONDecodeError:
            flat[key] = value  # a bare string
        if isinstance(flat[key], float) and math.isinf(flat[key]):  # 1e999, Infinity: every check read "inf"
            raise FleetError(f"{item!r}: {value} is too large to be a number (it reads as infinity); nothing was "
                             "published")
    settings = canonical_settings(flat)  # names as the agents take them (`SAMPLING.top_k` is `sampling.top_k`)
    targets = _config_targets(args)
    # what every agent would refuse is refused here, before it is published (KEY=null drops a key: nothing to check)
    check_desired_config(_without_nulls(settings))
    controller = _connect(args)
    published = []
    try:
        # one version for the whole group, above any it has (the controller's clock may have stepped back)
        version = controller.store.next_desired_version(targets, int(time.time() * 1000))
        for fleet, device in targets:
            published.append(controller.set_desired(fleet, device, settings, version, replace=args.replace)[1])
    except ConnectionError as exc:
        done = [f"{f}/{d}" for f, d in targets[:len(published)]]
        raise _lost(exc, done, len(targets), "desired config(s) published", "run the same command again: a device that has "
                    "it already ignores the same settings again") from None
    finally:
        controller.stop()
    where = f"{targets[0][0]}/{targets[0][1]}" if not args.group else \
        f"{len(targets)} device(s) of group {args.group}: {', '.join(f'{f}/{d}' for f, d in targets)}"
    whole = json.dumps(published[0]) if all(p == published[0] for p in published) else "(differs per device)"
    print(f"desired config version {version} for {where}: {json.dumps(settings)}; "
          f"{'replacing what was set before' if args.replace else 'with what was set before'}: {whole}")
    _warn_older_agents(args, targets, published)
    return 0


# settings agents gained after the first release, each with what shows that an agent knows it: an older agent refuses
# a whole desired config naming one (its config sections refuse unknown keys), and every later `config set` merges
# it in again until KEY=null drops it
# settings older agents refuse (the whole desired config with them), and the sign that an agent knows one: the
# devices that gave it (Store -> {(fleet, device)})
NEWER_SETTINGS = {"telemetry.health_interval_s": ("has sent a health snapshot", lambda store: set(store.health())),
                  "telemetry.histograms": ("has sent latency histograms (in the last day)",
                                           lambda store: store.histogram_senders())}


def _warn_older_agents(args, targets: list[tuple[str, str]], published: list[dict]) -> None:
    from agent.remote_config import named_keys

    db = _settings(args)[1].db
    store = _store(args, db) if Path(db).is_file() else None
    try:
        knows = {key: (sign, given(store) if store else set()) for key, (sign, given) in NEWER_SETTINGS.items()}
    finally:
        if store:
            store.close()
    for key, (sign, told) in knows.items():
        unsure = [f"{f}/{d}" for (f, d), p in zip(targets, published) if key in named_keys(p) and (f, d) not in told]
        if unsure:
            print(f"edgeglm fleet config set: warning: {key} is newer than some agents, and {', '.join(unsure)} never "
                  f"{sign.removeprefix('has ')} (agents from before it, or with it off): an agent older than "
                  f"the setting refuses the whole desired config (`fleet status` shows REFUSED); "
                  f"`config set {key}=null` takes it out again", file=sys.stderr)


def _without_nulls(settings: dict) -> dict:
    """`settings` less its KEY=null entries (and the sections they leave empty)."""
    out = {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in settings.items() if v is not None}
    return {k: v for k, v in out.items() if v != {}}


def _config_targets(args) -> list[tuple[str, str]]:
    if args.group and (args.device or args.fleet):
        raise FleetError("give --group G, or --fleet F --device D, not both")
    if args.group:
        from fleet.groups import select

        db = _db(args)
        if not db.is_file():
            raise FleetError(f"{db}: no fleet database, so no groups; is `edgeglm fleet serve --db {db}` running?")
        members = select(_store(args, db), args.group).members
        for fleet, device in members:  # a group made before ids were checked
            _check_ids(fleet, [device])
        return members
    if not (args.fleet and args.device):
        raise FleetError("config set needs --fleet F --device D, or --group G")
    _check_ids(args.fleet, [args.device])
    # as `fleet offer`: a retained config for a device id no box has (a typo) would wait on the broker for
    # whoever takes that id
    db = _db(args)
    known = []
    if db.is_file():
        store = _store(args, db)
        known = [d["device"] for d in store.devices(args.fleet)]
        store.close()
    if not args.force and not db.is_file():  # as `fleet offer`: a mistyped --db is no reason to publish blind
        raise FleetError(f"--device {args.fleet}/{args.device}: there is no fleet database at {db}, so no device has "
                         f"reported; nothing was published. Check --db, or give --force to publish the retained "
                         f"config for it")
    if args.device not in known and not args.force:
        raise FleetError(f"--device {args.fleet}/{args.device}: has never reported to the registry {db} (devices of "
                         f"fleet {args.fleet}: {_some_of(known, args.device)}); nothing was published. Check --fleet/"
                         f"--device (and --db), or give --force to publish the retained config for it")
    return [(args.fleet, args.device)]


def cmd_rollback(args) -> int:
    from fleet.config import load_fleet_config
    from fleet.groups import known_bundles, rollback_target, select
    from fleet.rollout import ROLLBACK_VALID_MAX_S, offer_rollback
    from ota.versions import VersionError, parse_version

    _check_number("--valid-for", args.valid_for, 0 < args.valid_for <= ROLLBACK_VALID_MAX_S,
                  f"in (0, {ROLLBACK_VALID_MAX_S:.0f}] seconds: how long the devices accept the rollback",
                  nothing="offered")
    key = _rollback_key(args, "rollback offers")
    store = _store(args, _existing_db(args))
    selection = select(store, args.group)
    devices = {(d["fleet"], d["device"]): d for d in store.devices()}
    running = {devices[m]["model_version"] for m in selection.members if m in devices}
    known = known_bundles(store, load_fleet_config(args.config).bundles.dir)
    served = store.served_versions()
    version, bundle = rollback_target(running, known, args.to, served)
    # newer known versions passed over because no device ever served them (their updates failed everywhere)
    skipped = sorted((v for v in known if v not in served and args.to is None and _between(v, version, running)),
                     key=parse_version)
    def newer(v) -> bool:  # only devices on a newer version go back; an older one would be upgraded by it
        try:
            return v is not None and parse_version(v) > parse_version(version)
        except VersionError:
            return False
    move = [m for m in selection.members if m in devices and newer(devices[m]["model_version"])]
    stay = [m for m in selection.members if m in devices and m not in move]
    unseen = [f"{f}/{d}" for f, d in selection.members if (f, d) not in devices]  # never reported: no version
    offered: dict[tuple[str, str], str] = {}
    if move:
        controller = _connect(args)
        try:
            for fleet in sorted({f for f, _ in move}):
                for f, d in move:  # one device at a time: what was offered is known if the broker goes away
                    if f == fleet:
                        ids = offer_rollback(controller, fleet, {d: devices[(f, d)]["model_version"]}, bundle, key,
                                             args.valid_for)
                        offered.update({(fleet, dev): u for dev, u in ids.items()})
        except ConnectionError as exc:
            done = [f"{f}/{d} ({u})" for (f, d), u in offered.items()]
            raise _lost(exc, done, len(move), "rollback offer(s) published", "run the same command again for the rest (a "
                        "device offered one takes the newest)") from None
        finally:
            controller.stop()
    if skipped:
        print(f"note: passed over {', '.join(skipped)}: no device of this controller served it (its updates failed, "
              f"or it was never offered); give --to {skipped[-1]} to roll back to it anyway")
    print(f"rollback of {selection.describe()} to {version} ({bundle}):")
    for fleet, device in move:
        d = devices[(fleet, device)]
        print(f"  {fleet}/{device}: {d['model_version'] or '-'} -> {version}, signed rollback offer "
              f"{offered[(fleet, device)]}{'' if d['online'] else ' (offline: it gets the offer when it reconnects)'}")
    expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + args.valid_for))
    never = f"; {len(unseen)} never seen by this controller, not offered: {', '.join(unseen)}" if unseen else ""
    on = sum(devices[m]["model_version"] == version for m in stay)
    below = [f"{f}/{d} ({devices[(f, d)]['model_version'] or 'no model'})" for f, d in stay
             if devices[(f, d)]["model_version"] != version]
    older = f"; {len(below)} on an older version or none, not offered: {', '.join(below)}" if below else ""
    signed = (f" Each offer is signed for its device and the version shown, once, until {expires} (--valid-for "
              f"{args.valid_for:g} s). `edgeglm fleet serve` serves the files (a device whose other slot still holds "
              f"{version} needs none); `edgeglm fleet status` shows the versions." if move else
              " Nothing was offered.")
    print(f"{len(move)} device(s) offered the rollback; {on} already on {version}{older}{never}.{signed}")
    return 0


def _between(v: str, low: str, running: set) -> bool:
    """`v` newer than `low` and older than the newest version of `running`."""
    from ota.versions import VersionError, parse_version

    parsed = []
    for r in running:  # (a version that does not parse is left out, as rollback_target does)
        try:
            parsed.append(parse_version(r))
        except (VersionError, TypeError):
            continue
    try:
        return bool(parsed) and parse_version(low) < parse_version(v) < max(parsed)
    except VersionError:
        return False


def cmd_group(args) -> int:
    from fleet.groups import check_group_name
    from fleet.rollout import group_add_checked

    db = _db(args)
    if not db.is_file():  # a mistyped --db made a new empty database that `serve` never reads
        raise FleetError(f"{db}: no fleet database (`edgeglm fleet serve --db {db}` makes it); check --db; nothing was "
                         f"{'changed' if args.group_command != 'list' else 'listed'}")
    store = _store(args, db)
    if args.group_command == "list":
        groups = store.groups()
        for name, members in groups.items():
            print(f"{name}: {' '.join(f'{f}/{d}' for f, d in members)}")
        if not groups:
            print("no groups; `edgeglm fleet group add G --fleet F DEVICE...` makes one")
        return 0
    if args.group_command == "add":
        if not args.fleet:
            raise FleetError("group add needs --fleet F: the fleet of the devices")
        _check_ids(args.fleet, args.devices)
        # refused if a device would then be in the targets of two active rollouts (unless --force)
        n, both = group_add_checked(store, check_group_name(store, args.group), args.fleet, args.devices,
                                    force=args.force)
        unknown = [d for d in args.devices if d not in {x["device"] for x in store.devices(args.fleet)}]
        note = f" ({', '.join(unknown)} not seen yet in fleet {args.fleet})" if unknown else ""
        print(f"group {args.group}: {n} device(s) added{note}; {len(store.groups()[args.group])} in all")
        for device, rollouts in both.items():
            first = min(rollouts, key=lambda r: r.id)
            print(f"warning: {device} is targeted by active rollouts "
                  f"{' and '.join(str(r.id) for r in rollouts)} (--force): the older, rollout {first.id}, offers it "
                  f"(unless a newer one has picked it already); the newer leave it out", file=sys.stderr)
        _warn_active_rollout(store, args.group, args.fleet, [d for d in args.devices if d not in both], added=True)
    else:
        groups = store.groups()
        if args.group not in groups:
            raise FleetError(f"group {args.group}: no such group (groups: {', '.join(sorted(groups)) or 'none'}); "
                             f"nothing was removed")
        listing = " ".join(f"{f}/{d}" for f, d in sorted(groups[args.group]))
        members = {d for f, d in groups[args.group] if args.fleet is None or f == args.fleet}
        if not members:
            raise FleetError(f"group {args.group} has no device of fleet {args.fleet} (members: {listing}); nothing "
                             f"was removed")
        absent = [d for d in args.devices if d not in members]
        if absent:
            where = f" of fleet {args.fleet}" if args.fleet else ""
            raise FleetError(f"group {args.group}: {', '.join(absent)}{where} {'is' if len(absent) == 1 else 'are'} "
                             f"not in it (members: {listing}); nothing was removed")
        gone = sorted(args.devices or members)
        gone_fleets = {d: f for f, d in groups[args.group] if d in gone and (args.fleet is None or f == args.fleet)}
        n = store.group_remove(args.group, args.devices or None, args.fleet)
        print(f"group {args.group}: {n} device(s) removed" + (f" (fleet {args.fleet})" if args.fleet else ""))
        for fleet in sorted(set(gone_fleets.values())):
            _warn_active_rollout(store, args.group, fleet, [d for d, f in gone_fleets.items() if f == fleet],
                                 added=False)
    return 0


def _warn_active_rollout(store, group: str, fleet: str, devices: list[str], added: bool) -> None:
    """Say what a membership change does to an active rollout of the group (its rest is the members when the
    canaries are done: a device added joins it, one removed is left out unless already offered)."""
    from fleet.rollout import load_rollouts

    for r in load_rollouts(store, active_only=True):
        if r.group != group or r.fleet != fleet:
            continue
        offered = sorted(d for d in devices if d in r.data.get("offers", {}))
        waiting = sorted(d for d in devices if d not in offered)
        picking = r.phase in ("canary", "canary_wait", "canary_window") or (r.phase == "rest"
                                                                            and not r.data.get("rest_picked"))
        about = f"warning: rollout {r.id} ({r.bundle.name} -> group {group}) is active (phase {r.phase}): "
        if added and waiting:
            print(about + (f"{', '.join(waiting)} will be offered it with the rest" if picking else
                           f"{', '.join(waiting)} joined after it picked its devices: not offered it (a new "
                           f"rollout to the group takes them)"), file=sys.stderr)
        elif not added and waiting and picking:
            print(about + f"{', '.join(waiting)} will not be offered it any more", file=sys.stderr)
        if not added and offered:
            print(f"warning: rollout {r.id} already offered {r.bundle.name} to {', '.join(offered)}: their update goes "
                  f"on (`edgeglm fleet rollback --group ...` or a new rollout takes them elsewhere)", file=sys.stderr)


def cmd_device(args) -> int:
    """`fleet device remove --fleet F DEVICE...`: out of the registry and off the broker."""
    from fleet.rollout import load_rollouts

    _check_ids(args.fleet, args.devices)
    store = _store(args, _existing_db(args))
    known = {d["device"]: d for d in store.devices(args.fleet)}
    unknown = [d for d in args.devices if d not in known]
    if unknown and not args.force:
        raise FleetError(f"device(s) {', '.join(unknown)} of fleet {args.fleet}: not in the registry (`edgeglm fleet "
                         f"status --fleet {args.fleet}` lists the registered ones); nothing was removed. --force "
                         f"clears what a forced `offer` or `config set` left retained for such an id on the broker")
    online = [d for d in args.devices if d in known and known[d]["online"]]
    if online and not args.force:
        raise FleetError(f"device(s) {', '.join(online)} of fleet {args.fleet}: online, so the agent would register "
                         f"again with its next state; stop the agent (and revoke its broker credentials) first, "
                         f"or give --force; nothing was removed")
    rollouts = {d: [r.id for r in load_rollouts(store, active_only=True) if r.fleet == args.fleet and
                    d in {*r.data.get("canaries", []), *r.data.get("rest", [])}] for d in args.devices}
    controller = _connect(args)
    removed_devices: list[str] = []
    try:
        for device in args.devices:
            try:
                controller.clear_retained(args.fleet, device)  # first: a failure leaves the registry as it was
            except ConnectionError as exc:
                raise _lost(exc, removed_devices, len(args.devices), "device(s) removed",
                            f"{device} and those after it are still registered: run the command again") from None
            removed_devices.append(f"{args.fleet}/{device}")
            if device not in known:  # --force: only what the broker kept for the id
                store.remove_device(args.fleet, device)  # a group membership or a recorded desired config, if any
                print(f"{args.fleet}/{device}: not in the registry; its retained desired config and offer cleared "
                      f"on the broker")
                continue
            removed = store.remove_device(args.fleet, device)
            notes = [f"{removed['groups']} group membership(s)" if removed["groups"] else "",
                     "its recorded desired config dropped" if removed["desired"] else "",
                     f"in active rollout(s) {', '.join(map(str, rollouts[device]))}: left out of them from now on"
                     if rollouts[device] else "",
                     "online: it registers again with its next state or telemetry report" if known[device]["online"]
                     else ""]
            print(f"{args.fleet}/{device}: removed from the registry; its retained desired config and offer "
                  f"cleared on the broker" + "".join(f"; {n}" for n in notes if n))
    finally:
        controller.stop()
    print(f"{len(args.devices)} device(s) removed; their telemetry and OTA history stay until the retention "
          f"(`[database] retention_s`) removes them")
    return 0


def register(sub) -> None:
    from fleet.rollout import MIN_REQUESTS

    f = sub.add_parser("fleet", help="the fleet controller")
    fsub = f.add_subparsers(dest="fleet_command", required=True)

    def common(p, broker=True):
        p.add_argument("--db", help="the controller's SQLite database (default fleet.db, or the config's)")
        p.add_argument("--config", help="fleet.toml (defaults < file < EDGEGLM_* env < flags)")
        if broker:
            p.add_argument("--broker", help="MQTT broker HOST:PORT or mqtt://HOST:PORT (default 127.0.0.1:1883, or the "
                                            "config's)")

    s = fsub.add_parser("serve", help="run the controller: registry, latency store, chunk server")
    common(s)
    s.add_argument("--fleet", help="serve one fleet (default: every fleet on the broker)")
    s.add_argument("--http-port", type=int, help="port of /healthz and /metrics (default 9100; 0: any free)")
    s.set_defaults(func=cmd_serve)

    st = fsub.add_parser("status", help="devices, models, latency")
    common(st, broker=False)
    st.add_argument("--fleet", help="only this fleet's devices and versions (default: every fleet)")
    st.add_argument("--json", action="store_true")
    st.add_argument("--since", type=float, default=3600.0,
                    help="seconds of telemetry the latency columns cover (default 3600)")
    st.set_defaults(func=cmd_status)

    o = fsub.add_parser("offer", help="offer a signed bundle to one device")
    common(o)
    o.add_argument("--fleet", required=True, help="the device's fleet")
    o.add_argument("--device", required=True)
    o.add_argument("--bundle", required=True)
    o.add_argument("--force", action="store_true",
                   help="offer to a device the registry has never seen (the retained offer waits for it), or a bundle "
                        "whose version was offered before with other contents")
    o.set_defaults(func=cmd_offer)

    r = fsub.add_parser("rollout", help="start a staged rollout gated by latency (`rollout cancel ID` stops one)",
                        usage="edgeglm fleet rollout --bundle B --group G --canary PCT [options]\n"
                              "       edgeglm fleet rollout cancel ID [--db fleet.db] [--config fleet.toml]")
    common(r, broker=False)
    # no `choices`: with them, a flag rollout does not take (`--broker 127.0.0.1:1883`) read as "argument cancel:
    # invalid choice: '127.0.0.1:1883'"; cmd_rollout says what is not understood
    r.add_argument("action", nargs="?", metavar="cancel",
                   help="stop rollout ID where it is (docs/fleet.md: what it leaves)")
    r.add_argument("rollout_id", nargs="?", type=int, metavar="ID", help="the rollout to cancel (`fleet status`)")
    r.add_argument("--bundle", help="the signed bundle to roll out (required to start one)")
    r.add_argument("--group", help="a group (`fleet group add`) or a fleet id (required to start one)")
    r.add_argument("--canary", type=float, help="percent of online devices offered first (required to start one)")
    r.add_argument("--max-p95-regression", type=float, default=20.0,
                   help="percent of p95 growth on the canaries that halts the rollout (default 20)")
    r.add_argument("--window", type=float, default=300.0,
                   help="seconds of canary telemetry before deciding (default 300)")
    r.add_argument("--min-free-memory-mb", type=float, default=None,
                   help="memory gate: halt when a canary's health snapshot on the new version says it can still "
                        "take less than this many MiB (default: off; the report gives each canary's memory anyway)")
    r.add_argument("--min-delta-ms", type=float, default=1.0,
                   help="a p95 growth below this many ms is never a regression (default 1.0)")
    r.add_argument("--min-requests", type=int, default=MIN_REQUESTS, metavar="N",
                   help="requests each canary must serve on the new version (within two windows) for the gate to "
                        f"pass, and before the update for its latency to be compared (default {MIN_REQUESTS})")
    r.add_argument("--previous-bundle", help="bundle to roll canaries back to when the rollout halts")
    r.add_argument("--key", help="private key that signs the canaries' rollback offers (default: [rollback] key "
                   "of --config)")
    r.add_argument("--force", action="store_true", help="roll out a bundle whose version was offered before with "
                   "other contents (devices that took that build are not offered this one)")
    r.set_defaults(func=cmd_rollout)

    c = fsub.add_parser("config", help="desired config of a device")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("set", help="publish desired config KEY=VALUE... (values are JSON or strings)")
    common(cs)
    cs.add_argument("--fleet")
    cs.add_argument("--device")
    cs.add_argument("--group", help="every device of a group (or fleet id), instead of --fleet/--device")
    cs.add_argument("--force", action="store_true",
                    help="publish for a --device the registry has never seen (the retained config waits for it)")
    cs.add_argument("--replace", action="store_true",
                    help="publish only these settings: the ones set before are dropped (default: merged over them)")
    cs.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    cs.set_defaults(func=cmd_config_set)

    b = fsub.add_parser("rollback", help="offer a signed rollback to the previous (or a named) version")
    common(b)
    b.add_argument("--group", required=True, help="a group (`fleet group add`) or a fleet id")
    b.add_argument("--to", metavar="VERSION", help="version to go back to (default: the previous known one)")
    b.add_argument("--key", help="private key that signs the rollback offers (a rollback key: its public half in "
                   "the agents' ota.rollback_keys; default: [rollback] key of --config)")
    b.add_argument("--valid-for", type=float, default=24 * 3600.0, metavar="SECONDS",
                   help="how long the devices accept the rollback (default 86400, at most 30 days)")
    b.set_defaults(func=cmd_rollback)

    g = fsub.add_parser("group", help="device groups kept by the controller")
    gsub = g.add_subparsers(dest="group_command", required=True)
    for name, text in (("add", "put devices in a group"), ("remove", "take devices (all without DEVICE) out")):
        ga = gsub.add_parser(name, help=text)
        common(ga, broker=False)
        ga.add_argument("group")
        ga.add_argument("--fleet", help="the devices' fleet (add; remove: only that fleet's devices)")
        ga.add_argument("devices", nargs="+" if name == "add" else "*", metavar="DEVICE")
        if name == "add":
            ga.add_argument("--force", action="store_true", help="add a device even if two active rollouts would "
                            "then target it (neither offers it while both are active)")
        ga.set_defaults(func=cmd_group)
    gl = gsub.add_parser("list", help="the groups and their devices")
    common(gl, broker=False)
    gl.set_defaults(func=cmd_group)

    dv = fsub.add_parser("device", help="the device registry")
    dsub = dv.add_subparsers(dest="device_command", required=True)
    dr = dsub.add_parser("remove", help="take devices out of the registry and clear their retained messages")
    common(dr)
    dr.add_argument("--fleet", required=True, help="the devices' fleet")
    dr.add_argument("--force", action="store_true", help="remove devices that are online too (they come back "
                    "with their next state or telemetry report unless their agent is stopped)")
    dr.add_argument("devices", nargs="+", metavar="DEVICE")
    dr.set_defaults(func=cmd_device)


if __name__ == "__main__":  # `python -m fleet.cli ARGS` is `edgeglm fleet ARGS` (it did nothing, exit 0)
    from agent.cli import main

    sys.exit(main(["fleet", *sys.argv[1:]]))
