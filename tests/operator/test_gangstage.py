"""A stage with resources.nodes > 1 through ``decide``: N pods and a Service per attempt, gang restarts, placement.

Pods are built by the operator's own builder and observed by ``observe_pod`` from raw objects, so the
labels, names and env that the decisions rely on are the ones a cluster would see.
"""

from __future__ import annotations

import copy

from ftoperator import gang, naming
from ftoperator.api import dump
from ftoperator.config import OperatorConfig
from ftoperator.decide import CreateObject, DeletePod, decide
from ftoperator.gangstage import gang_pod
from ftoperator.observe import ObservedChild, observe_pod
from ftoperator.validation import parse_spec, validate_spec


def two_pod_spec(spec, **distributed):
    spec = copy.deepcopy(spec)
    spec["resources"] = {"gpus": 0, "memory": "4Gi", "nodes": 2}
    spec["distributed"] = {"placementTimeoutSeconds": 60, "rendezvousTimeoutSeconds": 30, **distributed}
    return spec


def raw_pod(spec, run, config, stage, attempt, rank, phase="Running", *, node="node-a", deleting=None,
            exit_code=None, message=None, unschedulable=None, created="2025-01-01T12:00:00Z"):
    parsed, _ = parse_spec(spec)
    pod = gang_pod(parsed, run=run, stage=stage, attempt=attempt, rank=rank, config=config)
    pod["metadata"]["creationTimestamp"] = created
    if deleting:
        pod["metadata"]["deletionTimestamp"] = deleting
    pod["metadata"]["ownerReferences"][0]["uid"] = run.uid
    if node:
        pod["spec"]["nodeName"] = node
    status = {"phase": phase}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": unschedulable}]
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": message, "finishedAt": "2025-01-01T12:01:00Z"}}}]
    pod["status"] = status
    return observe_pod(pod)


def children_of(run, pods, stages=("sft",)):
    from ftoperator import builders

    children = [ObservedChild(o["kind"], o["metadata"]["name"], run.uid) for o in builders.run_infrastructure(run)]
    children += [ObservedChild("Pod", p.name, run.uid, deleting=p.deleting) for p in pods]
    children += [ObservedChild("ConfigMap", naming.stage_config_map_name(run.name, s), run.uid) for s in stages]
    return children


def reconcile(spec, status, pods, *, run, config, at):
    decision = decide(run=run, spec=spec, status=status, pods=pods, children=children_of(run, pods), now=at,
                      config=config)
    return decision, dump(decision.status)


def creates(decision, kind):
    return [a.obj for a in decision.actions if isinstance(a, CreateObject) and a.kind == kind]


def deletes(decision):
    return sorted(a.name for a in decision.actions if isinstance(a, DeletePod))


def env_of(pod):
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


def test_nodes_2_creates_both_ranks_and_the_rendezvous_service_in_one_pass(spec, run, config, now):
    decision, status = reconcile(two_pod_spec(spec), None, [], run=run, config=config, at=now())

    pods = creates(decision, "Pod")
    assert [p["metadata"]["name"] for p in pods] == ["demo-sft-1-0", "demo-sft-1-1"]
    assert [p["metadata"]["labels"][gang.LABEL_RANK] for p in pods] == ["0", "1"]
    assert all(p["metadata"]["labels"][gang.LABEL_GANG_SIZE] == "2" for p in pods)
    service = creates(decision, "Service")
    assert [s["metadata"]["name"] for s in service] == ["demo-sft-1"]
    assert service[0]["spec"]["selector"][gang.LABEL_RANK] == "0"
    assert service[0]["spec"]["clusterIP"] == "None" and service[0]["spec"]["publishNotReadyAddresses"]
    first, second = (env_of(p) for p in pods)
    assert first["PET_NODE_RANK"] == "0" and second["PET_NODE_RANK"] == "1"
    assert first["PET_MASTER_ADDR"] == "demo-sft-1.team-a.svc" == second["MASTER_ADDR"]
    assert first["FINETUNE_EXPECTED_WORLD_SIZE"] == "2" and first["PET_NPROC_PER_NODE"] == "1"
    assert first["PET_RDZV_CONF"] == "timeout=30" and first["FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS"] == "30"
    assert first["POD_NAME"] == "demo-sft-1-0"
    command = pods[0]["spec"]["containers"][0]["command"]
    assert command == ["python", "-m", "trainer.gang_launch", "--stage", "sft", "--config", "/etc/finetune/job.yaml"]
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in pods[0]["spec"]["containers"][0]["ports"]
    assert status["stages"]["sft"]["attempts"] == 1 and status["stages"]["sft"]["pod"] == "demo-sft-1-0"


def test_nodes_absent_or_1_keeps_the_single_pod_and_its_command(spec, run, config, now):
    one = copy.deepcopy(spec)
    one["resources"]["nodes"] = 1
    for variant in (spec, one):
        decision, _ = reconcile(variant, None, [], run=run, config=config, at=now())
        pods = creates(decision, "Pod")
        assert [p["metadata"]["name"] for p in pods] == ["demo-sft-1"]
        assert gang.LABEL_RANK not in pods[0]["metadata"]["labels"]
        assert pods[0]["spec"]["containers"][0]["command"][:3] == ["python", "-m", "trainer"]
        assert creates(decision, "Service") == []
        assert "PET_NNODES" not in env_of(pods[0])


def test_a_stage_can_override_nodes_alone(spec, run, config, now):
    spec = copy.deepcopy(spec)
    spec["stages"]["ppo"]["resources"] = {"nodes": 3}
    parsed, _ = parse_spec(spec)
    from ftoperator.gangstage import stage_nodes

    assert [stage_nodes(parsed, s) for s in ("sft", "reward", "ppo")] == [1, 1, 3]


def test_both_running_reports_running_then_both_succeeded_moves_to_the_next_stage(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [raw_pod(spec, run, config, "sft", 1, r) for r in (0, 1)]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(5))
    assert status["stages"]["sft"]["state"] == "Running" and status["state"] == "Running"
    assert "2 of 2 pods running" in status["stages"]["sft"]["message"]

    done = [raw_pod(spec, run, config, "sft", 1, r, "Succeeded", exit_code=0) for r in (0, 1)]
    decision, status = reconcile(spec, status, done, run=run, config=config, at=now(60))
    assert status["stages"]["sft"]["state"] == "Succeeded"
    assert [p["metadata"]["name"] for p in creates(decision, "Pod")] == ["demo-reward-1-0", "demo-reward-1-1"]


def test_one_rank_fails_the_other_is_deleted_and_the_next_attempt_waits_for_both_to_be_gone(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [raw_pod(spec, run, config, "sft", 1, 0, "Failed", exit_code=1, message="boom: CUDA error"),
            raw_pod(spec, run, config, "sft", 1, 1)]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(60))
    sft = status["stages"]["sft"]
    # The failed rank too: the next attempt starts only once every old pod is gone (gang rule 4).
    assert deletes(decision) == ["demo-sft-1-0", "demo-sft-1-1"]
    assert sft["failures"] == 1 and sft["disruptions"] == 0 and sft["state"] == "BackingOff"
    assert "rank 0 (demo-sft-1-0) ended" in sft["message"] and "boom: CUDA error" in sft["message"]
    assert sft["lastFailure"]["exitCode"] == 1

    # After the backoff the old rank 1 is still terminating: nothing of attempt 2 yet.
    late = now(60 + config.retry_max_seconds + 1)
    terminating = [pods[0], raw_pod(spec, run, config, "sft", 1, 1, deleting="2025-01-01T12:01:30Z")]
    decision, status = reconcile(spec, status, terminating, run=run, config=config, at=late)
    assert creates(decision, "Pod") == [] and status["stages"]["sft"]["attempts"] == 2
    assert "earlier attempt" in status["stages"]["sft"]["message"]

    decision, status = reconcile(spec, status, [], run=run, config=config, at=late)
    assert [p["metadata"]["name"] for p in creates(decision, "Pod")] == ["demo-sft-2-0", "demo-sft-2-1"]
    assert [s["metadata"]["name"] for s in creates(decision, "Service")] == ["demo-sft-2"]


def test_a_rank_deleted_from_outside_is_a_disruption_and_both_are_replaced(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [raw_pod(spec, run, config, "sft", 1, 0),
            raw_pod(spec, run, config, "sft", 1, 1, deleting="2025-01-01T12:02:00Z")]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(60))
    sft = status["stages"]["sft"]
    assert deletes(decision) == ["demo-sft-1-0"]
    assert sft["disruptions"] == 1 and sft["failures"] == 0
    assert "rank 1 (demo-sft-1-1) ended: it was deleted" in sft["message"]
    assert sft["attempts"] == 2  # the next attempt is recorded at once; its pods wait for the old ones

    decision, status = reconcile(spec, status, [], run=run, config=config, at=now(70))
    assert [p["metadata"]["name"] for p in creates(decision, "Pod")] == ["demo-sft-2-0", "demo-sft-2-1"]


def test_a_rank_failure_past_backoff_limit_fails_the_run_without_promising_a_resume(spec, run, config, now):
    spec = two_pod_spec(spec)
    spec["backoffLimit"] = 0
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [raw_pod(spec, run, config, "sft", 1, 0, "Failed", exit_code=1, message="boom: CUDA error"),
            raw_pod(spec, run, config, "sft", 1, 1)]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(60))
    assert status["state"] == "Failed" and status["stages"]["sft"]["reason"] == "BackoffLimitExceeded"
    assert "boom: CUDA error" in status["message"] and "spec.backoffLimit 0" in status["message"]
    assert "all 2 pods of attempt 1 are stopped" in status["message"]
    assert "resume" not in status["message"] and "next attempt" not in status["message"]
    assert deletes(decision) == ["demo-sft-1-0", "demo-sft-1-1"]


def test_nodes_back_to_1_mid_stage_stops_the_gang_then_one_pod_resumes(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [raw_pod(spec, run, config, "sft", 1, rank) for rank in (0, 1)]
    _, status = reconcile(spec, status, pods, run=run, config=config, at=now(30))
    assert status["stages"]["sft"]["state"] == "Running"

    single = copy.deepcopy(spec)
    single["resources"]["nodes"] = 1
    decision, status = reconcile(single, status, pods, run=run, config=config, at=now(60))
    assert deletes(decision) == ["demo-sft-1-0", "demo-sft-1-1"] and creates(decision, "Pod") == []
    assert "now runs as one pod" in status["stages"]["sft"]["message"]

    # Still terminating (checkpointing on SIGTERM): nothing new yet, and no second delete.
    terminating = [raw_pod(spec, run, config, "sft", 1, rank, deleting="2025-01-01T12:01:00Z") for rank in (0, 1)]
    decision, status = reconcile(single, status, terminating, run=run, config=config, at=now(70))
    assert deletes(decision) == [] and creates(decision, "Pod") == []

    decision, status = reconcile(single, status, [], run=run, config=config, at=now(80))
    sft = status["stages"]["sft"]
    assert [p["metadata"]["name"] for p in creates(decision, "Pod")] == ["demo-sft-2"]
    assert sft["attempts"] == 2 and sft["failures"] == 0 and sft["disruptions"] == 0
    assert sft.get("lastFailure") is None


def test_permanent_error_of_a_rank_fails_the_run_and_deletes_the_other(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    pods = [raw_pod(spec, run, config, "sft", 1, 0),
            raw_pod(spec, run, config, "sft", 1, 1, "Failed", exit_code=3, message="world size mismatch")]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(60))
    assert status["state"] == "Failed" and "world size mismatch" in status["message"]
    assert "demo-sft-1-0" in deletes(decision)


def test_partial_placement_says_k_of_n_and_is_released_after_the_timeout(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    waiting = "0/1 nodes are available: 1 Insufficient memory."
    pods = [raw_pod(spec, run, config, "sft", 1, 0),
            raw_pod(spec, run, config, "sft", 1, 1, "Pending", node=None, unschedulable=waiting)]
    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(10))
    sft = status["stages"]["sft"]
    assert sft["state"] == "WaitingForResources" and status["state"] == "WaitingForResources"
    assert sft["message"] == f"1 of 2 pods placed; rank 1 waits: {waiting}"
    assert deletes(decision) == [] and 49 <= decision.requeue_after <= 51

    decision, status = reconcile(spec, status, pods, run=run, config=config, at=now(61))
    sft = status["stages"]["sft"]
    assert deletes(decision) == ["demo-sft-1-0", "demo-sft-1-1"]
    assert sft["disruptions"] == 1 and sft["failures"] == 0
    assert sft["lastFailure"]["reason"] == "GangReleased" and "placementTimeoutSeconds 60" in sft["lastFailure"]["message"]


def test_validation_names_the_fields(spec):
    bad = two_pod_spec(spec, gangScheduler="volcano")
    bad["podTemplate"] = {"env": [{"name": "PET_NNODES", "value": "1"}]}
    _, errors = validate_spec(bad)
    fields = {e.field for e in errors}
    assert {"spec.podTemplate.schedulerName", "spec.podTemplate.env[0].name"} <= fields

    zero = copy.deepcopy(spec)
    zero["resources"]["nodes"] = 0
    _, errors = validate_spec(zero)
    assert any("nodes" in e.field for e in errors)

    hung = two_pod_spec(spec, progressTimeoutSeconds=10)
    _, errors = validate_spec(hung)
    assert [e.field for e in errors] == ["spec.distributed.progressTimeoutSeconds"]


def test_gang_scheduler_labels_and_progress_watchdog_env(spec, run, config):
    parsed, _ = parse_spec(two_pod_spec(spec, gangScheduler="kueue", progressTimeoutSeconds=120))
    pod = gang_pod(parsed, run=run, stage="sft", attempt=3, rank=1, config=config)
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "demo-sft-3"
    assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
    assert env_of(pod)["FINETUNE_PROGRESS_TIMEOUT_SECONDS"] == "120"


def test_a_pod_group_scheduler_gets_the_attempts_pod_group_before_any_pod(spec, run, config, now):
    for scheduler, api_version in (("coscheduling", "scheduling.x-k8s.io/v1alpha1"),
                                   ("volcano", "scheduling.volcano.sh/v1beta1")):
        raw = two_pod_spec(spec, gangScheduler=scheduler)
        raw["podTemplate"] = {"schedulerName": "gang-scheduler"}
        decision, _ = reconcile(raw, None, [], run=run, config=config, at=now())
        kinds = [a.kind for a in decision.actions if isinstance(a, CreateObject) and a.kind in ("PodGroup", "Pod")]
        assert kinds == ["PodGroup", "Pod", "Pod"], kinds  # the scheduler must know the group first
        (group,) = creates(decision, "PodGroup")
        assert group["apiVersion"] == api_version and group["metadata"]["name"] == "demo-sft-1"
        assert group["spec"]["minMember"] == 2
        assert group["metadata"]["ownerReferences"][0]["uid"] == run.uid  # deleted with the run
        # coscheduling gives up binding when our placement timeout releases the pods; Volcano has no such field.
        assert group["spec"].get("scheduleTimeoutSeconds") == (60 if scheduler == "coscheduling" else None)
        for pod in creates(decision, "Pod"):
            assert pod["spec"]["schedulerName"] == "gang-scheduler"
    decision, _ = reconcile(two_pod_spec(spec, gangScheduler="kueue"), None, [], run=run, config=config, at=now())
    assert creates(decision, "PodGroup") == []  # Kueue groups plain pods by their labels


def test_the_stage_command_override_is_kept_for_gang_pods(spec, run):
    parsed, _ = parse_spec(two_pod_spec(spec))
    config = OperatorConfig(trainer_image="t", stage_command_override="echo hi")
    pod = gang_pod(parsed, run=run, stage="sft", attempt=1, rank=0, config=config)
    assert pod["spec"]["containers"][0]["command"] == ["/bin/sh", "-c", "echo hi"]


def test_a_rank_stopped_by_sigterm_is_not_the_cause_when_its_peer_was_deleted(spec, run, config, now):
    spec = two_pod_spec(spec)
    _, status = reconcile(spec, None, [], run=run, config=config, at=now())
    # Rank 1 was deleted; rank 0 saw the stop (the all-reduced SIGTERM flag), checkpointed and exited first.
    pods = [raw_pod(spec, run, config, "sft", 1, 0, "Failed", exit_code=143, message="Interrupted: SIGTERM"),
            raw_pod(spec, run, config, "sft", 1, 1, deleting="2025-01-01T12:02:00Z")]
    _, status = reconcile(spec, status, pods, run=run, config=config, at=now(60))
    sft = status["stages"]["sft"]
    assert (sft["failures"], sft["disruptions"]) == (0, 1)
    assert "rank 1 (demo-sft-1-1) ended: it was deleted" in sft["lastFailure"]["message"]
