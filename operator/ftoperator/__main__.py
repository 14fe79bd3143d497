"""``python -m ftoperator``: run the FineTuneRun operator.

Examples::

    python -m ftoperator                                   # cluster-wide, webhook with a self-signed cert
    python -m ftoperator --namespace team-a --no-webhook
    python -m ftoperator --webhook-url https://127.0.0.1:9443   # local control plane: the API server calls
                                                                # this URL; the operator registers the webhook
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from ftoperator.config import OperatorConfig

TRAINER_IMAGE_ENV = "FINETUNE_TRAINER_IMAGE"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 disables)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftoperator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", action="append", default=[], metavar="NS",
                        help="watch only this namespace (repeatable; kopf globs allowed); default: cluster-wide")
    parser.add_argument("--metrics-port", type=_port, default=8080, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--liveness-port", type=_port, default=8081, help="kopf liveness /healthz port (0: off)")
    webhook = parser.add_argument_group("admission webhook")
    webhook.add_argument("--no-webhook", action="store_true",
                         help="serve no webhook; runs are still validated before any pod is created")
    webhook.add_argument("--webhook-port", type=_port, default=9443, help="port the webhook server listens on")
    webhook.add_argument("--webhook-addr", default="0.0.0.0", help="address the webhook server listens on")
    webhook.add_argument("--webhook-cert", type=Path, help="PEM certificate (default: self-signed, generated)")
    webhook.add_argument("--webhook-key", type=Path, help="PEM private key of --webhook-cert")
    webhook.add_argument("--webhook-url",
                         help="URL the API server calls, e.g. https://127.0.0.1:9443 where Services do not route; "
                              "with it the operator creates and maintains the ValidatingWebhookConfiguration "
                              "'finetune.dev' itself (its port is also the listening port). Without it the "
                              "operator only serves, and the Helm chart owns the configuration.")
    trainer = parser.add_argument_group("stage pods")
    trainer.add_argument("--trainer-image", default=os.environ.get(TRAINER_IMAGE_ENV),
                         help=f"image of runs without spec.image (default: ${TRAINER_IMAGE_ENV})")
    trainer.add_argument("--max-gpus-per-stage", type=int, default=8,
                         help="reject stages asking for more GPUs than this (default 8, the GPUs of one node; "
                              "0: no limit)")
    trainer.add_argument("--create-retry-limit", type=int, default=10,
                         help="creates refused in a row by the API server (quota, admission) before a run fails")
    trainer.add_argument("--image-pull-timeout-seconds", type=float, default=600.0,
                         help="fail a stage whose image cannot be pulled for this long")
    trainer.add_argument("--stuck-terminating-seconds", type=float, default=300.0,
                         help="force-delete and replace a pod still terminating this long after its grace "
                              "period, on a node that stopped reporting")
    trainer.add_argument("--trainer-metrics-port", type=_port, default=9400,
                         help="trainer /metrics port in stage pods (0: off)")
    trainer.add_argument("--report-interval-seconds", type=float, default=2.0,
                         help="minimum seconds between two progress updates from a trainer")
    trainer.add_argument("--resync-seconds", type=float, default=30.0,
                         help="reconcile every run at least this often, events or not")
    trainer.add_argument("--reconcile-workers", type=int, default=16,
                         help="threads running reconcile passes (each run has at most one at a time)")
    trainer.add_argument("--stage-command-override", default=None,
                         help="BENCHMARK HOOK, not for users: run this shell command instead of the trainer in "
                              "every stage pod (benchmarks/operator_scale.py)")
    election = parser.add_argument_group("high availability")
    election.add_argument("--leader-election-namespace", metavar="NS",
                          help="elect a leader with the Lease 'finetune-operator' in this namespace: only the "
                               "replica holding it acts, the others wait (default: off, for a single replica)")
    election.add_argument("--leader-election-id", default=os.environ.get("POD_NAME") or socket.gethostname(),
                          help="this replica's identity in the Lease (default: $POD_NAME, else the host name)")
    election.add_argument("--lease-duration-seconds", type=int, default=15,
                          help="a leader that has not renewed for this long may be replaced")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if bool(args.webhook_cert) != bool(args.webhook_key):
        parser.error("--webhook-cert and --webhook-key go together")
    if args.webhook_url and urlparse(args.webhook_url).scheme != "https":
        parser.error(f"--webhook-url {args.webhook_url!r}: the API server only calls https:// webhooks")
    return args


def webhook_server(args: argparse.Namespace):
    """The kopf webhook server for these flags, or None with --no-webhook."""
    import kopf

    from ftoperator import certs

    if args.no_webhook:
        return None
    url = urlparse(args.webhook_url) if args.webhook_url else None
    host = url.hostname if url else None
    port = (url.port if url and url.port else None) or args.webhook_port
    certfile, keyfile = args.webhook_cert, args.webhook_key
    if certfile is None:
        hosts = [h for h in (host, "localhost", "127.0.0.1", socket.gethostname()) if h]
        certfile, keyfile = certs.write_self_signed(Path(tempfile.mkdtemp(prefix="ftoperator-webhook-")), hosts)
    return kopf.WebhookServer(addr=args.webhook_addr, port=port, host=host,
                              path=(url.path.rstrip("/") or None) if url else None,
                              certfile=str(certfile), pkeyfile=str(keyfile))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kopf

    from ftoperator import handlers  # noqa: F401  (registers the handlers)
    from ftoperator.kubeapi import KubeApi, load_api_client
    from ftoperator.metrics import OperatorMetrics
    from ftoperator.reconciler import RunLoops, RunReconciler

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # kopf logs every handler call at INFO ("Handler 'pod_changed' succeeded") -- one line per pod
        # event. Our own decisions are logged by ftoperator.* at INFO.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(
        trainer_image=args.trainer_image,
        max_gpus_per_stage=args.max_gpus_per_stage or None,
        create_retry_limit=args.create_retry_limit,
        image_pull_timeout_seconds=args.image_pull_timeout_seconds,
        stuck_terminating_seconds=args.stuck_terminating_seconds,
        trainer_metrics_port=args.trainer_metrics_port or None,
        report_interval_seconds=args.report_interval_seconds,
        stage_command_override=args.stage_command_override,
    )
    metrics = OperatorMetrics()
    api = KubeApi(load_api_client(connections=args.reconcile_workers + 8), on_request=lambda verb: metrics.api_requests.labels(verb=verb).inc())
    reconciler = RunReconciler(api=api, config=config, metrics=metrics)
    elector = None
    if args.leader_election_namespace:
        from ftoperator.election import LeaderElector

        elector = LeaderElector(api, namespace=args.leader_election_namespace, identity=args.leader_election_id,
                                duration_seconds=args.lease_duration_seconds)
        elector.acquire(health_port=args.liveness_port or None)  # blocks while another replica leads
    memo = kopf.Memo(
        config=config,
        metrics=metrics,
        metrics_port=args.metrics_port,
        reconciler=reconciler,
        loops=RunLoops(reconciler, resync_seconds=args.resync_seconds, workers=args.reconcile_workers),
        webhook_server=webhook_server(args),
        manage_webhook=bool(args.webhook_url) and not args.no_webhook,
    )
    try:
        # standalone: no kopf peering; at most one replica gets here (the Lease above).
        kopf.run(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
            memo=memo,
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
