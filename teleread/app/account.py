"""People's accounts on the command line: a password for ``users add --password`` and ``users
passwd`` (on the hub's machine, straight into its database), and ``login`` / ``logout`` /
``whoami`` (over gRPC, from anywhere). ``login`` keeps the session in a file only its user can read;
the other client commands use it when no ``--token`` or ``TELEREAD_TOKEN`` is given."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

import grpc

from teleread.client import (
    add_connection_args,
    atomic_write_text,
    connect_or_explain,
    describe_rpc_error,
    open_channel,
    print_error,
    saved_session,
    session_file,
)
from teleread.errors import InvalidInput
from teleread.settings import ClientSettings
from teleread.v1 import auth_pb2, auth_pb2_grpc


def read_password(prompt: str = "password: ", *, confirm: bool = False) -> str:
    """A password from the terminal (asked twice with ``confirm``), or one line of standard input
    when it is not a terminal (scripts: ``printf '%s\\n' "$PW" | teleread users add ...``)."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise InvalidInput("the two passwords differ", reason="PASSWORD_MISMATCH")
    return first


def cmd_users_passwd(args: argparse.Namespace) -> int:
    from teleread.app.cli import _engine, _settings
    from teleread.signin import set_password

    settings = _settings(args)
    set_password(
        _engine(args),
        name=args.name,
        password=read_password(f"new password for {args.name}: ", confirm=True),
        min_length=settings.auth.min_password_length,
    )
    print(f"password of {args.name} set")
    return 0


def _client(args: argparse.Namespace) -> ClientSettings:
    found = getattr(args, "client_settings", None)
    return found if isinstance(found, ClientSettings) else ClientSettings.model_construct()


def cmd_login(args: argparse.Namespace) -> int:
    client = _client(args)
    hub = args.hub or client.hub or "127.0.0.1:50051"
    user = args.user or input("user: ")
    password = read_password()
    channel = open_channel(
        hub, token="", ca_file=args.ca, server_name=args.server_name, client_cert=args.cert, client_key=args.key
    )
    try:
        session = auth_pb2_grpc.AuthStub(channel).SignIn(
            auth_pb2.SignInRequest(user=user, password=password, client="cli"), timeout=args.timeout
        )
    except grpc.RpcError as err:
        print_error(describe_rpc_error(err))
        return 1
    finally:
        channel.close()
    path = session_file(client)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_text(path, json.dumps({"hub": hub, "token": session.token, "user": session.identity.user}))
    os.chmod(path, 0o600)
    who = session.identity
    where = who.hospital and f" at {who.hospital}" or who.site and f" of {who.site}" or ""
    idle = session.idle_seconds // 60
    print(f"signed in as {who.user} ({who.role}{where}); the session lapses after {idle} idle minutes")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    client = _client(args)
    saved = saved_session(client)
    if saved is None:
        print("not signed in")
        return 0
    channel = open_channel(args.hub or saved.get("hub") or "127.0.0.1:50051", token=saved["token"], ca_file=args.ca)
    try:
        auth_pb2_grpc.AuthStub(channel).SignOut(auth_pb2.SignOutRequest(), timeout=args.timeout)
    except grpc.RpcError as err:  # a lapsed session is signed out already; the file goes either way
        if err.code() != grpc.StatusCode.UNAUTHENTICATED:  # type: ignore[attr-defined]
            print_error(describe_rpc_error(err))
    finally:
        channel.close()
    Path(session_file(client)).unlink(missing_ok=True)
    print("signed out")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    channel = connect_or_explain(args)
    if channel is None:
        return 2
    try:
        who = auth_pb2_grpc.AuthStub(channel).WhoAmI(auth_pb2.WhoAmIRequest(), timeout=args.timeout)
    except grpc.RpcError as err:
        print_error(describe_rpc_error(err))
        return 1
    finally:
        channel.close()
    print(json.dumps({"user": who.user, "role": who.role, "site": who.site, "hospital": who.hospital}))
    return 0


def add_account_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("login", help="sign in to the hub with a user name and password (keeps a session)")
    p.add_argument("--user", default=None, help="user name (asked when not given)")
    add_connection_args(p)
    p.set_defaults(func=cmd_login)
    p = sub.add_parser("logout", help="end the session `teleread login` keeps")
    add_connection_args(p)
    p.set_defaults(func=cmd_logout)
    p = sub.add_parser("whoami", help="who the hub takes this command line for")
    add_connection_args(p)
    p.set_defaults(func=cmd_whoami)
