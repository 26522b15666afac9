"""`edgeglm fleet ...`: the controller's commands.

    edgeglm fleet serve [--broker HOST:PORT] [--db fleet.db] [--fleet F]
    edgeglm fleet status [--db fleet.db] [--fleet F] [--json]
    edgeglm fleet offer --fleet F --device D --bundle BUNDLE [--broker HOST:PORT] [--db fleet.db]
    edgeglm fleet config set --fleet F --device D KEY=VALUE... [--broker HOST:PORT]

`serve` runs until SIGTERM/Ctrl-C. `offer` and `config set` publish through a short-lived
connection; the serving controller answers the chunk requests of an offer from the shared
database.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from agent.errors import AgentError


class FleetError(AgentError):
    """A fleet command cannot do what was asked."""


def _broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise FleetError(f"--broker {value!r} is not HOST:PORT (e.g. 127.0.0.1:1883)")
    return host, int(port)


def _settings(args):
    from fleet.controller import ControllerSettings

    host, port = _broker(args.broker)
    return ControllerSettings(broker_host=host, broker_port=port, db=Path(args.db),
                              fleet=getattr(args, "fleet", None) or "+")


def _connect(args):
    from fleet.controller import FleetController

    try:
        return FleetController(_settings(args)).start()
    except ConnectionError as exc:
        raise FleetError(str(exc)) from None


def cmd_serve(args) -> int:
    controller = _connect(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"fleet controller: broker {args.broker}, database {args.db}; Ctrl-C stops", flush=True)
    stop.wait()
    controller.stop()
    return 0


def cmd_status(args) -> int:
    from fleet.controller import format_status
    from fleet.store import Store

    if not Path(args.db).is_file():
        raise FleetError(f"{args.db}: no fleet database; is `edgeglm fleet serve --db {args.db}` running?")
    store = Store(args.db)
    if args.json:
        print(json.dumps({"devices": store.devices(args.fleet)}, indent=2))
    else:
        print(format_status(store, args.fleet))
    return 0


def cmd_offer(args) -> int:
    controller = _connect(args)
    try:
        update_id = controller.offer(args.fleet, args.device, Path(args.bundle))
    finally:
        controller.stop()
    print(f"offered {args.bundle} to {args.fleet}/{args.device} as update {update_id}")
    return 0


def cmd_config_set(args) -> int:
    settings: dict = {}
    for item in args.pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetError(f"{item!r} is not KEY=VALUE (e.g. sampling.max_tokens=128)")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string
        node = settings
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    controller = _connect(args)
    try:
        version = controller.set_desired(args.fleet, args.device, settings)
    finally:
        controller.stop()
    print(f"desired config version {version} for {args.fleet}/{args.device}: {json.dumps(settings)}")
    return 0


def register(sub) -> None:
    f = sub.add_parser("fleet", help="the fleet controller")
    fsub = f.add_subparsers(dest="fleet_command", required=True)

    def common(p, broker=True):
        p.add_argument("--db", default="fleet.db", help="the controller's SQLite database")
        if broker:
            p.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker HOST:PORT")

    s = fsub.add_parser("serve", help="run the controller: registry, latency store, chunk server")
    common(s)
    s.add_argument("--fleet", help="serve one fleet (default: every fleet on the broker)")
    s.set_defaults(func=cmd_serve)

    st = fsub.add_parser("status", help="devices, models, latency")
    common(st, broker=False)
    st.add_argument("--fleet")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    o = fsub.add_parser("offer", help="offer a signed bundle to one device")
    common(o)
    o.add_argument("--fleet", required=True)
    o.add_argument("--device", required=True)
    o.add_argument("--bundle", required=True)
    o.set_defaults(func=cmd_offer)

    c = fsub.add_parser("config", help="desired config of a device")
    csub = c.add_subparsers(dest="config_command", required=True)
    cs = csub.add_parser("set", help="publish desired config KEY=VALUE... (values are JSON or strings)")
    common(cs)
    cs.add_argument("--fleet", required=True)
    cs.add_argument("--device", required=True)
    cs.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    cs.set_defaults(func=cmd_config_set)
