"""The ``nucleus`` command. Apart from ``run`` it is a thin client of the daemon over IPC.

Errors the user can act on are one line on stderr and a non-zero exit; the daemon's own
error codes come back verbatim, so ``nucleus deploy`` names the file, field or component
exactly as the daemon's log does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nucleus.errors import DaemonNotRunningError, NucleusError
from nucleus.paths import Paths, default_root

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root).expanduser().resolve() if args.root else default_root()


def _client(root: Path) -> Any:
    from ipc import Client

    paths = Paths.at(root)
    sock = paths.ipc_socket
    hint = f"start one with: nucleus run --root {root}"
    try:
        present = sock.exists()
    except PermissionError:  # a root that is not ours: say so, not "no daemon" or a traceback
        raise DaemonNotRunningError(
            f"cannot reach {sock}: permission denied (run as the daemon's user)"
        ) from None
    if not present:
        raise DaemonNotRunningError(f"no nucleus daemon: no socket at {sock}; {hint}")
    try:
        token = paths.cli_token.read_text().strip()
    except PermissionError as exc:
        raise DaemonNotRunningError(
            f"cannot read the CLI token {paths.cli_token} (run as the daemon's user)"
        ) from exc
    except OSError as exc:
        raise DaemonNotRunningError(f"no nucleus daemon: no CLI token at {paths.cli_token}; {hint}") from exc
    return Client(sock, token, name="nucleus-cli")


async def _connect(root: Path) -> Any:
    from ipc.errors import IpcError

    client = _client(root)
    try:
        await client.connect()
    except (OSError, IpcError) as exc:
        raise DaemonNotRunningError(
            f"no nucleus daemon answering at {Paths.at(root).ipc_socket} ({exc}); "
            f"start one with: nucleus run --root {root}"
        ) from exc
    return client


def _fmt_since(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from nucleus.daemon import run_daemon
    from nucleus.settings import load_settings

    overrides: dict[str, Any] = {}
    if args.thing_name:
        overrides["thing_name"] = args.thing_name
    from nucleus import users

    users.check_root_access(_root(args))  # a line naming the path and both users, not a traceback
    settings = load_settings(_root(args), **overrides)
    if settings.ipc.socket_group is not None:
        users.socket_group_id(settings.ipc.socket_group)
    from ipc.listener import check_socket_path

    try:  # found before anything starts, not as a traceback from the listener
        for socket_path in (settings.paths.ipc_socket, settings.paths.gg_socket):
            check_socket_path(socket_path)
    except ValueError as exc:
        raise NucleusError(f"the root is too long: {exc}; choose a shorter --root", field="--root") from exc
    return run_daemon(settings)


def _parse_config_update(texts: list[str] | None) -> dict[str, dict[str, Any]]:
    from cloud_sync.deployment_document import combine_config_updates

    try:
        return combine_config_updates(texts)
    except ValueError as exc:
        raise NucleusError(str(exc), field="--update-config") from exc


def _parse_run_with(texts: list[str] | None) -> dict[str, dict[str, Any]]:
    from cloud_sync.deployment_document import parse_run_with

    try:
        return parse_run_with(texts)
    except ValueError as exc:
        raise NucleusError(str(exc), field="--run-with") from exc


def build_deploy_request(args: argparse.Namespace) -> dict[str, Any]:
    from nucleus.recipe import find_recipes, load_recipe
    from nucleus.versions import Version

    recipes: list[dict[str, Any]] = []
    roots: dict[str, Version] = {}
    artifact_dirs: list[str] = [str(Path(a).resolve()) for a in args.artifacts or []]
    for raw in args.paths:
        path = Path(raw)
        if not path.exists():
            raise NucleusError("no such file or directory", path=path)
        files = find_recipes(path)
        if path.is_dir() and not files:
            raise NucleusError("no recipe files (*.yaml, *.yml, *.json) in this directory", path=path)
        for file in files:
            recipe = load_recipe(file)  # errors name the file and field, before anything is sent
            fmt = "json" if file.suffix.lower() == ".json" else "yaml"
            recipes.append({"source": str(file.resolve()), "text": file.read_text(), "format": fmt})
            if recipe.name not in roots or recipe.version > roots[recipe.name]:
                roots[recipe.name] = recipe.version
        # Greengrass CLI layout: <dir>/recipes + <dir>/artifacts; a recipe file beside ../artifacts.
        base = path if path.is_dir() else path.parent
        for candidate in (base / "artifacts", base.parent / "artifacts"):
            if not args.artifacts and candidate.is_dir() and str(candidate.resolve()) not in artifact_dirs:
                artifact_dirs.append(str(candidate.resolve()))
    # --recipe-dir: recipes for the local store (dependencies), not roots (greengrass-cli --recipeDir).
    for raw in args.recipe_dir or []:
        directory = Path(raw)
        if not directory.is_dir():
            raise NucleusError("--recipe-dir is not a directory", path=directory)
        for file in find_recipes(directory):
            load_recipe(file)
            fmt = "json" if file.suffix.lower() == ".json" else "yaml"
            recipes.append({"source": str(file.resolve()), "text": file.read_text(), "format": fmt})
    for item in args.merge or []:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise NucleusError(f"--merge {item!r}: expected NAME=VERSION", field="--merge")
        roots[name] = Version.parse(version)
    request: dict[str, Any] = {
        "group": args.group,
        "recipes": recipes,
        "root_components": {n: f"={v}" for n, v in roots.items()},
        "remove": list(args.remove or []),
        "artifact_dirs": artifact_dirs,
        "config_updates": _parse_config_update(args.update_config),
        "run_with": _parse_run_with(args.run_with),
        "failure_policy": "DO_NOTHING" if args.failure_policy == "do-nothing" else "ROLLBACK",
    }
    if args.timeout:
        request["timeout_s"] = args.timeout
    if args.settle is not None:
        request["settle_time_s"] = args.settle
    return request


def _print_declared_clients(root: Path, components: dict[str, Any]) -> None:
    """Recipes with no lifecycle are local applications: show a new client token once."""
    for name, info in sorted(components.items()):
        if not info.get("client"):
            continue
        token_file = Paths.at(root).client_token(name)
        if not info.get("client_token_created"):
            print(f"local client {name}: token unchanged in {token_file}")
            continue
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            print(f"local client {name}: token stored in {token_file} ({exc.strerror})")
            continue
        print(f"local client {name}: token (shown once, stored owner-only in {token_file}):")
        print(token)


async def _deploy(args: argparse.Namespace) -> int:
    request = build_deploy_request(args)
    if not any(request[k] for k in ("root_components", "remove", "config_updates", "run_with")):
        print("nucleus deploy: nothing to deploy (give recipe files, --remove, --update-config or --run-with)",
              file=sys.stderr)
        return EXIT_USAGE
    client = await _connect(_root(args))
    async with client:
        created = await client.call("deployments.create", request)
    did = created["id"]
    names = ", ".join(f"{n} {v.lstrip('=')}" for n, v in request["root_components"].items())
    print(f"deployment {did}: {names or 'update'}")
    if created.get("queue_position", 0) > 0:
        print(f"  queued behind {created['queue_position']} deployment(s) already running or queued")
    if args.no_wait:
        return EXIT_OK
    return await _follow_deployment(_root(args), did, args.restart_wait)


DAEMON_RESTART_WAIT_S = 120.0  # a bootstrap step may restart the nucleus; its start is seconds


async def _follow_deployment(root: Path, did: str, restart_wait_s: float = DAEMON_RESTART_WAIT_S) -> int:
    """Print a deployment's progress until it ends. A bootstrap step that asks for a nucleus restart
    (exit 100) closes the connection mid-deployment; the deployment goes on after the restart, so
    reconnect and keep following it rather than report the closed connection as a failure."""
    from ipc.errors import ConnectionClosed

    last_seq, wait_s, lost = 0, 0.0, False
    for _ in range(10):  # bounded: a deployment restarts the nucleus once per bootstrap step at most
        try:
            connected = await _connect_waiting(root, wait_s)
        except DaemonNotRunningError:
            if not lost:
                raise  # never connected: the usual "no daemon" error
            # It went away mid-deployment and did not come back: the outcome is not known here. A daemon
            # that starts again resumes a deployment it had not begun to apply, or rolls one back.
            print(f"deployment {did}: outcome unknown: the nucleus did not come back within {wait_s:g} s; when it "
                  "starts again it resumes or rolls back this deployment (see `nucleus deployments`)",
                  file=sys.stderr)
            return EXIT_FAILED
        try:
            async with connected as client, client.stream("deployments.watch", {"id": did}) as events:
                async for event in events:
                    if event.get("event") == "progress":
                        if int(event.get("seq") or 0) <= last_seq:
                            continue  # printed before the restart
                        last_seq = int(event.get("seq") or 0)
                        who = f"[{event['component']}] " if event.get("component") else ""
                        print(f"  {time.strftime('%H:%M:%S', time.localtime(event['ts']))} {who}{event['message']}")
                    elif event.get("event") == "finished":
                        status = event["status"]
                        if status == "SUCCEEDED":
                            print(f"deployment {did}: SUCCEEDED")
                            _print_declared_clients(root, event.get("components") or {})
                            return EXIT_OK
                        print(f"deployment {did}: {status}: {event.get('reason') or ''}", file=sys.stderr)
                        return EXIT_FAILED
            return EXIT_FAILED
        except ConnectionClosed:
            # A bootstrap step's restart (exit 100) does this by design; a crash or a stop looks the same.
            print(f"  the connection to the nucleus closed (a bootstrap step's restart, or the nucleus stopped); "
                  f"following the deployment if it is back within {restart_wait_s:g} s", flush=True)
            wait_s, lost = restart_wait_s, True
    return EXIT_FAILED


async def _list(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        components = await client.list_components()
    if args.json:
        print(json.dumps(components, indent=2))
        return EXIT_OK
    rows = [[c["name"], c["version"], c["state"], _fmt_since(c.get("since"))] for c in components]
    run_with = [_fmt_run_with(c.get("run_with")) for c in components]
    headers = ["NAME", "VERSION", "STATE", "SINCE"]
    if any(run_with):  # only when some component has limits or a user of its own: the usual table otherwise
        rows = [[*row, text or "-"] for row, text in zip(rows, run_with, strict=True)]
        headers.append("RUN WITH")
    print(_table(rows, headers) if rows else "no components")
    return EXIT_OK


def _fmt_run_with(run_with: dict[str, Any] | None) -> str:
    """A component's user (when a deployment set it) and limits, each with where it came from."""
    if not run_with:
        return ""
    parts = []
    limits = run_with.get("systemResourceLimits") or {}
    if limits:
        text = ", ".join(f"memory {v} KB" if k == "memory" else f"cpus {v:g}" for k, v in limits.items())
        parts.append(f"{text} ({run_with.get('systemResourceLimits_from', '?')})")
    if run_with.get("posixUser_from") == "deployment":
        parts.append(f"user {run_with.get('posixUser')} (deployment)")
    if run_with.get("oom_kills"):
        parts.append(f"{run_with['oom_kills']} OOM-killed")
    return "; ".join(parts)


async def _connect_waiting(root: Path, wait_s: float) -> Any:
    """Like _connect, but a daemon that is still starting (no socket, no token, not answering yet) is
    given up to ``wait_s`` seconds: `nucleus run ... &` followed by a command is a race a script loses."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await _connect(root)
        except DaemonNotRunningError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.2)


async def _status(args: argparse.Namespace) -> int:
    client = await _connect_waiting(_root(args), args.wait)
    async with client:
        if not args.name:
            info = await client.call("nucleus.status")
            print(json.dumps(info, indent=2))
            return EXIT_OK
        details = await client.get_component(args.name)
    print(json.dumps(details, indent=2, default=str))
    return EXIT_OK


async def _logs(args: argparse.Namespace) -> int:
    from ipc.errors import ConnectionClosed

    client = await _connect(_root(args))
    last: str | None = None
    try:
        async with client, client.stream(
            "logs.tail", {"name": args.name, "lines": args.lines, "follow": args.follow}
        ) as lines:
            async for line in lines:
                print(line, flush=True)
                last = line
    except ConnectionClosed:
        if not args.follow:
            raise
        # `logs -f` ended with the daemon (a stop, a restart, a bootstrap's exit 100) while the component's
        # log goes on when it is back: keep following the file, as `tail -F` would.
        await _follow_file(_root(args), args.name, last)
    return EXIT_OK


def _line_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be a number of lines, 0 or more, got {text!r}")
    return count


async def _follow_file(root: Path, name: str, last: str | None) -> None:
    from nucleus.component_logs import follow, tail

    paths = Paths.at(root)
    path = paths.nucleus_log if name == "nucleus" else paths.component_log(name)
    print(f"(the nucleus closed the connection; following {path})", file=sys.stderr, flush=True)
    seen = tail(path, 100_000) if path.exists() else []
    skip = 0
    if last is not None and last in seen:
        skip = len(seen) - seen[::-1].index(last)  # the lines after the last one printed
    async for line in follow(path, from_end=False):
        if skip:
            skip -= 1
            continue
        print(line, flush=True)


async def _restart(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        result = await client.restart_component(args.name, force=args.force)
    print(f"{args.name}: {result['state']}")
    return EXIT_OK


async def _stop(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        result = await client.stop_component(args.name)
    print(f"{args.name}: {result['state']}")
    return EXIT_OK


async def _deployments(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        if args.id:
            d = await client.get_deployment(args.id)
            print(f"{d['id']}  {d['status']}  group={d['group']}  {d.get('reason') or ''}".rstrip())
            for e in d.get("events", []):
                who = f"[{e['component']}] " if e.get("component") else ""
                print(f"  {_fmt_since(e['ts'])} {who}{e['message']}")
            return EXIT_OK
        items = await client.list_deployments()
    rows = [[d["id"], d["group"], d["status"], _fmt_since(d["created_at"]), (d.get("reason") or "")[:60]]
            for d in items]
    print(_table(rows, ["ID", "GROUP", "STATUS", "CREATED", "REASON"]) if rows else "no deployments")
    return EXIT_OK


def _fmt_sync(info: dict[str, Any]) -> str:
    spool, link = info.get("spool", {}), info.get("link", {})
    link_line = (f"link      {link.get('state')}  broker={link.get('broker') or '-'}"
                 + (f"  next attempt in {link['next_attempt_in_s']:.1f}s"
                    if link.get("next_attempt_in_s") is not None else ""))
    if spool.get("messages") is None:  # the spool could not be opened: no figures, not "None messages"
        lines = [link_line, f"backlog   unavailable: {spool.get('error') or 'the spool is not open'}",
                 f"status    {info.get('status_topic')}"]
    else:
        lines = [
            link_line,
            f"backlog   {spool.get('messages')} messages, {spool.get('bytes')} bytes"
            f"  (max {spool.get('max_messages')} / {spool.get('max_bytes')} B, overflow {spool.get('overflow')})",
            f"sent      {spool.get('delivered')} delivered since the spool was created; "
            f"{link.get('published_messages')} MQTT messages since the daemon started",
            f"dropped   overflow={spool.get('dropped_overflow')} expired={spool.get('dropped_expired')}"
            f" refused_full={spool.get('rejected_full')} refused_disk_full={spool.get('rejected_disk_full')}"
            # lost before the spool: a forward rule's local queue overflowed (drop-oldest)
            f" forward_queue={info.get('forwarder', {}).get('local_dropped', 0)}",
            f"status    {info.get('status_topic')}",
        ]
    lines += [f"error     {e.get('code')}: {e.get('message')}" + _repeated(e) for e in info.get("errors", [])[-5:]]
    return "\n".join(lines)


def _repeated(error: dict[str, Any]) -> str:
    """The uplink counts an error that repeats (every reconnect attempt) on one entry: say so."""
    if error.get("count", 1) <= 1 or error.get("since") is None:
        return ""
    since, last = (time.strftime("%H:%M:%S", time.localtime(error[k])) for k in ("since", "ts"))
    return f"  ({error['count']} times, {since} to {last})"


async def _sync_status(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        info = await client.call("sync.status")
    print(json.dumps(info, indent=2, default=str) if args.json else _fmt_sync(info))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from nucleus.recipe import find_recipes, load_recipe

    failed = 0
    files: list[str | Path] = []
    for given in args.files:  # a directory means its recipe files, as `nucleus deploy DIR` reads them
        found = find_recipes(Path(given)) if Path(given).is_dir() else [given]
        if not found:
            failed += 1
            print(f"INVALID {given}: no recipe files (*.yaml, *.yml, *.json) in this directory")
        files.extend(found)
    for raw in files:
        try:
            recipe = load_recipe(raw)
        except NucleusError as exc:
            failed += 1
            print(f"INVALID {exc}")
            continue
        except OSError as exc:
            failed += 1
            print(f"INVALID {raw}: {exc.strerror}")
            continue
        print(f"ok      {raw}: {recipe.name} {recipe.version}")
    return EXIT_FAILED if failed else EXIT_OK


def _read_policy(path: str | None) -> Any:
    if not path:
        return None
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError:
        import yaml

        return yaml.safe_load(text)


async def _client_add(args: argparse.Namespace) -> int:
    policy = _read_policy(args.policy)
    client = await _connect(_root(args))
    async with client:
        result = await client.call("clients.add", {"name": args.name, "policy": policy,
                                                   "keep_token": args.keep_token})
    if result.get("token_kept"):
        print(f"client {result['name']}: policy replaced; token unchanged in {result['token_file']}, "
              "its open sessions stay")
        return EXIT_OK
    print(f"client {result['name']} added; token (shown once, stored in {result['token_file']}):")
    print(result["token"])
    return EXIT_OK


async def _client_list(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        clients = await client.call("clients.list")
    if args.json:
        print(json.dumps(clients, indent=2))
        return EXIT_OK
    if not clients:
        print("no declared clients")
        return EXIT_OK
    width = max(4, *(len(c["name"]) for c in clients))
    print(f"{'NAME':<{width}}  DECLARED BY  SESSIONS  TOKEN FILE")
    for c in clients:
        print(f"{c['name']:<{width}}  {c['declared_by']:<11}  {c['sessions']:>8}  {c['token_file']}")
    return EXIT_OK


async def _client_remove(args: argparse.Namespace) -> int:
    client = await _connect(_root(args))
    async with client:
        await client.call("clients.remove", {"name": args.name})
    print(f"client {args.name} removed: its token no longer opens a session, and its open sessions ended")
    return EXIT_OK


def cmd_model(args: argparse.Namespace) -> int:
    """`nucleus model ...` is the model builder's own CLI (scikit-learn is imported only there)."""
    import importlib

    argv = list(args.model_args)
    if argv[:1] == ["record"] and "--socket" not in argv and not {"-h", "--help"} & set(argv):
        # The nucleus owns the layout: record through this root's socket with the CLI's token, after the
        # same "no daemon" check every other command makes.
        root = _root(args)
        _client(root)
        paths = Paths.at(root)
        argv += ["--socket", str(paths.ipc_socket), "--token-file", str(paths.cli_token)]
    builder = importlib.import_module("components.model_builder.cli")
    return int(builder.main(argv))


def cmd_fleet(args: argparse.Namespace) -> int:
    """`nucleus fleet ...` is the cloud-side deployment tool (cloud_sync.fleet); no daemon needed."""
    from cloud_sync import fleet
    from nucleus.recipe import load_recipe

    return fleet.main(list(args.fleet_args), validate_recipe=load_recipe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleus", description="An edge runtime for Greengrass V2 recipes.")
    root_help = (f"nucleus root directory (default: $NUCLEUS_ROOT, else /var/lib/nucleus for root, else "
                 f"~/.local/share/nucleus; here: {default_root()})")
    parser.add_argument("--root", help=root_help)
    # `nucleus run --root X` is how people type it too: the subcommands that talk to a root take it as
    # well (SUPPRESS: absent there, the global value stands).
    rooted = argparse.ArgumentParser(add_help=False)
    rooted.add_argument("--root", default=argparse.SUPPRESS, help=root_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[rooted], **kw)

    p = add("run", "run the daemon in the foreground")
    p.add_argument("--thing-name", help="the device's thing name (default: host name)")
    p.set_defaults(func=cmd_run, is_async=False)

    p = add("deploy", "install or update components")
    p.add_argument("paths", nargs="*", metavar="RECIPE_OR_DIR")
    p.add_argument("--artifacts", action="append", metavar="DIR",
                   help="artifact directory laid out as DIR/<name>/<version>/<file>")
    p.add_argument("--update-config", action="append", metavar="JSON",
                   help='{"Name": {"MERGE": {...}, "RESET": ["/ptr"]}} or @file.json; may be given again for other '
                   "components")
    p.add_argument("--run-with", action="append", metavar="NAME:FIELD=VALUE",
                   help="Greengrass runWith for a component, kept by later deployments: FIELD posixUser "
                   "(user[:group]), memory (KB, hard limit) or cpus (cores, e.g. 0.5; the limits given replace the "
                   "old ones as a whole); NAME:posixUser= clears the user, NAME:systemResourceLimits= both limits; "
                   "or a JSON {NAME: {posixUser, "
                   "systemResourceLimits}} / @file.json; may be given again")
    p.add_argument("--recipe-dir", action="append", metavar="DIR",
                   help="add these recipes to the local store without making them roots (for this deployment's "
                   "resolution: versions no deployment uses are removed after the next successful one)")
    p.add_argument("--merge", action="append", metavar="NAME=VERSION", help="add or update a root component")
    p.add_argument("--remove", action="append", metavar="NAME", help="remove a root component")
    p.add_argument("--group", default="LOCAL_DEPLOYMENT", help="deployment group (default LOCAL_DEPLOYMENT)")
    p.add_argument("--failure-policy", choices=["rollback", "do-nothing"], default="rollback")
    p.add_argument("--timeout", type=float, metavar="S", help="device-side deployment timeout")
    p.add_argument("--settle", type=float, metavar="S", help="seconds RUNNING before success (default 5)")
    p.add_argument("--no-wait", action="store_true", help="queue and return")
    p.add_argument("--restart-wait", type=float, default=DAEMON_RESTART_WAIT_S, metavar="S",
                   help="how long to wait for a nucleus that goes away mid-deployment (a bootstrap step's "
                   f"restart) before saying the outcome is unknown (default {DAEMON_RESTART_WAIT_S:g})")
    p.set_defaults(func=_deploy, is_async=True)

    p = add("list", "components with version, state and since")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list, is_async=True)

    p = add("status", "one component's details (or the daemon's)")
    p.add_argument("name", nargs="?")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="give a daemon that is still starting up to S seconds to answer (for scripts)")
    p.set_defaults(func=_status, is_async=True)

    p = add("logs", "a component's log ('nucleus' for the daemon's)")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=_line_count, default=50, help="the last N lines (default 50; 0: none)")
    p.set_defaults(func=_logs, is_async=True)

    p = add("restart", "restart a component")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="also leave BROKEN")
    p.set_defaults(func=_restart, is_async=True)

    p = add("stop", "stop a component")
    p.add_argument("name")
    p.set_defaults(func=_stop, is_async=True)

    p = add("deployments", "list deployments, or show one")
    p.add_argument("id", nargs="?")
    p.set_defaults(func=_deployments, is_async=True)

    p = sub.add_parser("recipe", help="recipe tools")
    rsub = p.add_subparsers(dest="recipe_command", required=True)
    v = rsub.add_parser("validate", help="check recipe files (or the recipe files in a directory)")
    v.add_argument("files", nargs="+")
    v.set_defaults(func=cmd_validate, is_async=False)

    p = sub.add_parser("model", help="anomaly models (train, sign, package as a component)", add_help=False)
    p.add_argument("model_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_model, is_async=False)

    p = sub.add_parser("sync", help="cloud sync: spool backlog, broker link, drops")
    ssub = p.add_subparsers(dest="sync_command", required=True)
    st = ssub.add_parser("status", help="backlog, link state and counters of the cloud uplink", parents=[rooted])
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_sync_status, is_async=True)

    p = sub.add_parser("fleet", help="fleet deployments through an MQTT broker: deploy, status, clear",
                       add_help=False)
    p.add_argument("fleet_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_fleet, is_async=False)

    p = sub.add_parser("client", help="declared local clients")
    csub = p.add_subparsers(dest="client_command", required=True)
    a = csub.add_parser("add", help="declare a client and print its token once", parents=[rooted])
    a.add_argument("name")
    a.add_argument("--policy", metavar="FILE", help="accessControl policy (JSON or YAML)")
    a.add_argument("--keep-token", action="store_true",
                   help="replace the policy of an existing client and keep its token and open sessions "
                        "(without it, the token is rotated and the old one's sessions end)")
    a.set_defaults(func=_client_add, is_async=True)
    ls = csub.add_parser("list", help="declared clients, who declared them, their open sessions", parents=[rooted])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_client_list, is_async=True)
    rm = csub.add_parser("remove", help="forget a client's token and policy; its sessions end", parents=[rooted])
    rm.add_argument("name")
    rm.set_defaults(func=_client_remove, is_async=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "fleet":  # its own parser reads every option, --help included
        args.fleet_args = [*extra, *args.fleet_args]
    elif extra and args.command == "model":  # likewise (`nucleus model --help`, `model -h`)
        args.model_args = [*extra, *args.model_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.func is not cmd_run:
        # The CLI's own warnings (e.g. a recipe's unknown keys) go to stderr, never stdout.
        from nucleus import logconfig

        logconfig.configure("warning", stream=sys.stderr)
    try:
        rc = int(asyncio.run(args.func(args))) if args.is_async else int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`nucleus deployments | head`): not our error, so no traceback; stdout
        # goes to /dev/null so that the interpreter's last flush does not raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe
    except NucleusError as exc:
        print(f"nucleus: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        from ipc.errors import IpcError

        if isinstance(exc, IpcError):
            print(f"nucleus: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise
