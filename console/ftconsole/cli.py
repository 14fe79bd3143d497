"""Command line: run the console, or move labels in and out as preference JSON Lines.

    python -m ftconsole serve [--port 8090] [--namespace NS ...] [--secure-cookie]
    python -m ftconsole labels export -n NS [--run RUN] [--round N] [-o FILE]
    python -m ftconsole labels import FILE -n NS --run RUN [--round N] [--labeller NAME]

``labels`` talk to the cluster of the current kubeconfig context as *you* (kubectl's identity),
so your RBAC applies: export needs ``list preferencelabels``, import ``create preferencelabels``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_labels(args: argparse.Namespace) -> int:
    from ftconsole import labels
    from ftconsole.kube import ConsoleKube, api_client

    kube = ConsoleKube(api_client(in_cluster=False))
    specs = [labels.parse_label(obj) for obj in kube.list_labels(args.namespace, run=args.run)]
    specs = [s for s in specs if (args.run is None or s.run == args.run)
             and (args.round is None or s.round == args.round)]
    result = labels.preference_rows(sorted(specs, key=labels.sort_key))
    text = labels.to_jsonl(result.rows)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    print(f"exported {len(result.rows)} preference rows from {len(specs)} labels; left out "
          f"{result.skipped['tie']} tie and {result.skipped['bothBad']} bothBad", file=sys.stderr)
    return 0


def import_labels(args: argparse.Namespace) -> int:
    from ftconsole import labels
    from ftconsole.kube import ConsoleKube, api_client

    source = Path(args.file)
    try:
        specs = labels.labels_from_jsonl(source.read_text(encoding="utf-8"), source=str(source), run=args.run,
                                         round=args.round, labeller=args.labeller, labelled_at=_now())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kube = ConsoleKube(api_client(in_cluster=False))
    for spec in specs:
        kube.create_label(labels.label_object(spec, namespace=args.namespace))
    print(f"imported {len(specs)} labels into {args.namespace} for run {args.run} round {args.round}",
          file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    from ftconsole.server import run_server

    run_server(host=args.host, port=args.port, namespaces=args.namespace or None, secure_cookie=args.secure_cookie)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m ftconsole", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run the web console")
    run.add_argument("--host", default="0.0.0.0")
    run.add_argument("--port", type=int, default=8090)
    run.add_argument("--namespace", action="append",
                     help="show runs of these namespaces only (repeat); default all (needs cluster-wide RBAC)")
    run.add_argument("--secure-cookie", action="store_true",
                     help="mark the login cookie Secure (behind HTTPS, e.g. an ingress with TLS)")
    run.set_defaults(handler=serve)

    label_commands = commands.add_parser("labels", help="export or import PreferenceLabels").add_subparsers(
        dest="labels_command", required=True)
    export = label_commands.add_parser("export", help="write labels as preference JSON Lines")
    export.add_argument("-n", "--namespace", required=True)
    export.add_argument("--run", help="only this run's labels")
    export.add_argument("--round", type=int, help="only this round's labels")
    export.add_argument("-o", "--output", default="-", help="file to write; - for stdout (default)")
    export.set_defaults(handler=export_labels)
    imp = label_commands.add_parser("import", help="create labels from preference JSON Lines")
    imp.add_argument("file", help="JSON Lines with prompt, chosen, rejected")
    imp.add_argument("-n", "--namespace", required=True)
    imp.add_argument("--run", required=True, help="FineTuneRun the labels are for")
    imp.add_argument("--round", type=int, default=0)
    imp.add_argument("--labeller", default="import", help="recorded as who labelled (default: import)")
    imp.set_defaults(handler=import_labels)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.handler(args))
