"""The ``teleread`` command: one entry point with a subcommand for every process and task.

``main(argv)`` is callable from tests. Settings are read once here (``TELEREAD_*``) and passed
down; subcommands added by the capability packages register themselves on the parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from teleread.errors import TelereadError
from teleread.logs import configure_logging
from teleread.settings import ClientSettings, Settings, build


def _settings(args: argparse.Namespace, **options: object) -> Settings:
    data_dir = getattr(args, "data_dir", None)
    return build(data_dir=Path(data_dir) if data_dir else None, **options)


def cmd_serve(args: argparse.Namespace) -> int:
    from teleread.app.hub import serve

    settings = _settings(args, grpc__port=args.port, grpc__host=args.host or None)
    configure_logging(settings.log_level)
    serve(settings)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from teleread.db.engine import upgrade

    settings = _settings(args)
    upgrade(settings.resolved_database_url())
    print("database schema is up to date")
    return 0


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from teleread.db.engine import make_engine, upgrade

    url = _settings(args).resolved_database_url()
    upgrade(url)
    return make_engine(url)


def cmd_sites_add(args: argparse.Namespace) -> int:
    from teleread.auth import Role, add_principal, add_site

    engine = _engine(args)
    add_site(engine, code=args.code, name=args.name or args.code, lead_hospital=args.lead)
    token = add_principal(engine, name=f"site-{args.code}", role=Role.SITE, site_code=args.code)
    print(f"site {args.code} added (lead hospital {args.lead})")
    print(f"site token (shown once, keep it secret): {token}")
    return 0


def cmd_users_add(args: argparse.Namespace) -> int:
    from teleread.app.account import read_password
    from teleread.auth import Role, add_principal
    from teleread.signin import PEOPLE, hash_password

    role = Role(args.role)
    password_hash = None
    if args.password:
        if role not in PEOPLE:
            raise TelereadError(f"a {role.value} is a machine identity: it has no password", reason="NOT_A_PERSON")
        min_length = _settings(args).auth.min_password_length
        password_hash = hash_password(read_password(confirm=True), min_length=min_length)
    token = add_principal(
        _engine(args),
        name=args.name,
        role=role,
        site_code=args.site,
        hospital=args.hospital,
        password_hash=password_hash,
    )
    print(f"{args.role} {args.name} added" + (" (signs in with the password)" if password_hash else ""))
    print(f"token (shown once, keep it secret): {token}")
    return 0


def cmd_users_passwd(args: argparse.Namespace) -> int:
    from teleread.app.account import cmd_users_passwd as passwd

    return passwd(args)


def cmd_proto(args: argparse.Namespace) -> int:
    from teleread import protogen

    if args.action == "gen":
        for path in protogen.generate():
            print(path)
        return 0
    drift = protogen.drift()
    if drift:
        print("generated code differs from proto/: " + ", ".join(drift) + " (run: teleread proto gen)")
        return 1
    print("generated code matches proto/")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    from teleread.tls import make_local_pki

    for path in make_local_pki(Path(args.out), hosts=args.host, clients=args.client):
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from teleread.app.demo import run_demo

    return run_demo(
        data_dir=Path(args.data_dir) if args.data_dir else None, station=args.station, station_port=args.port
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teleread", description="Remote ECG and imaging reading network")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the hub (ingest, worklist, results, triage workers)")
    p.add_argument("--data-dir")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("action", choices=["upgrade"])
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("sites", help="register clinics")
    s = p.add_subparsers(dest="action", required=True)
    a = s.add_parser("add", help="add a site and print its token")
    a.add_argument("code")
    a.add_argument("--name")
    a.add_argument("--lead", required=True, help="code of the lead hospital that reads for this site")
    a.add_argument("--data-dir")
    a.set_defaults(func=cmd_sites_add)

    p = sub.add_parser("users", help="register people and machines")
    s = p.add_subparsers(dest="action", required=True)
    a = s.add_parser("add", help="add a user and print their token")
    a.add_argument("name")
    a.add_argument(
        "--role", required=True, choices=["technician", "result_puller", "cardiologist", "radiologist", "admin"]
    )
    a.add_argument("--site", help="site code (technicians and result pullers)")
    a.add_argument("--hospital", help="lead hospital code (cardiologists and radiologists)")
    a.add_argument(
        "--password", action="store_true", help="set a password to sign in with (asked twice, or one line on stdin)"
    )
    a.add_argument("--data-dir")
    a.set_defaults(func=cmd_users_add)
    a = s.add_parser("passwd", help="set a person's password (asked twice, or one line on stdin)")
    a.add_argument("name")
    a.add_argument("--data-dir")
    a.set_defaults(func=cmd_users_passwd)

    p = sub.add_parser("proto", help="generated gRPC code")
    p.add_argument("action", choices=["gen", "check"])
    p.set_defaults(func=cmd_proto)

    p = sub.add_parser("tls", help="TLS certificates")
    s = p.add_subparsers(dest="action", required=True)
    a = s.add_parser("init", help="make a local CA, a hub certificate and client certificates")
    a.add_argument("--out", required=True)
    a.add_argument("--host", action="append", default=None, help="hub host name (repeat)")
    a.add_argument("--client", action="append", default=None, help="client certificate name (repeat)")
    a.set_defaults(func=cmd_tls_init)

    p = sub.add_parser("demo", help="run the whole path on the embedded defaults and narrate it")
    p.add_argument("--data-dir")
    p.add_argument(
        "--station", action="store_true", help="then keep the hub and a reading station running with exams to read"
    )
    p.add_argument("--port", type=int, default=8080, help="the station's port with --station (default 8080)")
    p.set_defaults(func=cmd_demo)

    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from teleread.app.account import add_account_parsers
    from teleread.gateway.clinic.service import add_gateway_parser
    from teleread.gateway.uploader.client import add_upload_parser
    from teleread.models.training.manage import add_models_parser
    from teleread.reader.station.serve import add_station_parser
    from teleread.reader.clients.queue_client import add_read_parser
    from teleread.reader.clients.results_client import add_results_parser

    for register in (
        add_upload_parser,
        add_read_parser,
        add_results_parser,
        add_models_parser,
        add_gateway_parser,
        add_account_parsers,
        add_station_parser,
    ):
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.client_settings = ClientSettings()  # the clients' hub and token, read once
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except TelereadError as exc:
        print(f"error: {exc.message} ({exc.reason})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
