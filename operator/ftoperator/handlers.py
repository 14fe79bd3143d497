"""kopf wiring: thin handlers that hand over to the reconciler, the progress copier and validation.

* every FineTuneRun has a reconcile loop (level-based, see ``reconciler.RunLoops``), started by
  the run's first watch event (kopf's initial listing included) and ended by its deletion;
* watch events on runs (spec changes), their pods and their progress ConfigMaps nudge that loop
  or copy progress -- they never decide anything themselves;
* a validating admission handler calls the pure validation.

No change-detecting handler (on.create/update/delete) and no kopf daemon is registered, so kopf
stores no last-handled-configuration annotation on runs (kopf #1087) and puts no finalizer on
them: a run can be deleted while the operator is scaled to zero or uninstalled, and its children
go with it through their owner references. Operators before this one used kopf daemons and so a
finalizer, ``finetune.dev/operator``; kopf removes it from a run when it next sees it, since no
handler here needs it.

Expected in ``memo`` (set by ``__main__``): ``loops`` (RunLoops), ``reconciler``
(RunReconciler), ``config`` (OperatorConfig), ``metrics`` (OperatorMetrics),
``metrics_port``, ``webhook_server`` (or None), ``manage_webhook``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from ftoperator import GROUP, KIND, PLURAL, VERSION, naming
from ftoperator.validation import describe, validate_admission

WEBHOOK_ID = "validate-finetunerun"
"""kopf serves the handler at /validate-finetunerun (the chart's webhook path)."""
FINALIZER = f"{GROUP}/operator"
MANAGED_WEBHOOK_CONFIGURATION = GROUP


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    # We post our own events with specific reasons; kopf's would repeat its log lines on the run.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.admission.server = memo.webhook_server
    settings.admission.managed = MANAGED_WEBHOOK_CONFIGURATION if memo.manage_webhook else None
    if memo.metrics_port:
        memo.metrics.serve(memo.metrics_port)
        logger.info(f"Prometheus metrics on :{memo.metrics_port}/metrics")


def _owning_run(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            return ref.get("name")
    return None


@kopf.on.cleanup()
async def stop_loops(memo: kopf.Memo, **_: Any) -> None:
    await memo.loops.stop_all()


# async: it starts an asyncio task, which needs the event loop's thread (kopf runs sync handlers in threads).
@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_changed(type: str, body: Any, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        memo.loops.forget(namespace, name)
        return
    if memo.loops.ensure(namespace, name):
        return  # a new loop's first pass is immediate
    generation = body.get("metadata", {}).get("generation")
    if generation != body.get("status", {}).get("observedGeneration"):
        memo.loops.nudge(namespace, name)


@kopf.on.event("", "v1", "pods", labels={naming.LABEL_RUN: kopf.PRESENT})
def pod_changed(body: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    run = _owning_run(body)
    if run is not None:
        memo.loops.nudge(namespace, run)


@kopf.on.event("", "v1", "configmaps",
               labels={naming.LABEL_COMPONENT: naming.COMPONENT_PROGRESS, naming.LABEL_MANAGED_BY: naming.MANAGED_BY})
async def progress_changed(type: str, body: Any, namespace: str, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    run = _owning_run(body)
    if run is None or type == "DELETED":
        return
    try:
        await asyncio.to_thread(memo.reconciler.copy_progress, namespace, run, dict(body))
    except Exception as exc:  # progress is best effort; the next update brings it again
        memo.metrics.reconcile_errors.labels(handler="progress").inc()
        logger.warning(f"cannot copy progress of {namespace}/{run}: {exc!r}")


@kopf.on.validate(GROUP, VERSION, PLURAL, id=WEBHOOK_ID, operations=["CREATE", "UPDATE"])
def validate(operation: str, body: Any, old: Any, memo: kopf.Memo, **_: Any) -> None:
    errors = validate_admission(
        operation=operation,
        new_spec=dict(body.get("spec") or {}),
        old_spec=dict(old.get("spec") or {}) if old is not None else None,
        old_status=dict(old.get("status") or {}) if old is not None else None,
        max_gpus_per_stage=memo.config.max_gpus_per_stage,
        default_image=memo.config.trainer_image,
    )
    if errors:
        raise kopf.AdmissionError(f"FineTuneRun {body.get('metadata', {}).get('name', '')}: {describe(errors)}",
                                  code=422)
