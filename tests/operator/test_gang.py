"""Gang decisions for a stage of N pods (ftoperator.gang): all or none, one ends -> all end, placement timeout.

Members are written as raw pods and go through ``observe_gang_pod``, as the reconciler will feed them.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from ftoperator import naming
from ftoperator.gang import (
    LABEL_RANK, GangSettings, decide_gang, gang_pod_labels, gang_pod_name, gang_scheduler_metadata, master_address,
    observe_gang_pod, rendezvous_env, rendezvous_service, rendezvous_service_name,
)

from .conftest import T0
from .test_layers import FORBIDDEN_IN_PURE, imports_of

SETTINGS = GangSettings(nodes=3, placement_timeout_seconds=600, node_lost_seconds=120, stuck_terminating_seconds=300)


def at(seconds: float):
    return T0 + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def member(rank: int, phase: str = "Running", *, attempt: int = 0, node: str | None = "node-a", created: float = 0,
           unschedulable: str | None = None, exit_code: int | None = None, message: str | None = None,
           finished: float | None = None, pod_reason: str | None = None, deleted_at: float | None = None,
           not_ready_since: float | None = None):
    """A raw gang pod of stage ppo, observed through observe_gang_pod."""
    conditions = []
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    if not_ready_since is not None:
        conditions.append({"type": "Ready", "status": "False", "lastTransitionTime": stamp(not_ready_since)})
    elif phase == "Running":
        conditions.append({"type": "Ready", "status": "True"})
    status = {"phase": phase, "conditions": conditions}
    if pod_reason:
        status["reason"] = pod_reason
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code, "reason": "Error", "message": message or "",
            "finishedAt": stamp(finished if finished is not None else 0)}}}]
    meta = {"name": gang_pod_name("demo", "ppo", attempt, rank), "creationTimestamp": stamp(created),
            "labels": gang_pod_labels("demo", "ppo", attempt, rank, SETTINGS.nodes)}
    if deleted_at is not None:
        meta["deletionTimestamp"] = stamp(deleted_at)
    pod = {"metadata": meta, "spec": {"containers": [{"name": "trainer"}], **({"nodeName": node} if node else {})},
           "status": status}
    observed = observe_gang_pod(pod)
    assert observed is not None
    return observed


def names(decision):
    return sorted(d.name for d in decision.deletes)


def test_gang_module_is_pure():
    bad = {n for n in imports_of("gang") if any(n == f or n.startswith(f + ".") for f in FORBIDDEN_IN_PURE)}
    assert not bad


# ----------------------------------------------------------------------------- all or none


def test_a_new_attempt_creates_all_n_ranks_in_one_pass():
    decision = decide_gang(attempt=0, pods=[], settings=SETTINGS, now=at(0))
    assert decision.state == "Creating"
    assert decision.create_ranks == (0, 1, 2)
    assert not decision.deletes


def test_a_pass_interrupted_mid_creation_creates_only_the_missing_ranks():
    pods = [member(0, "Pending", node=None)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(1))
    assert decision.create_ranks == (1, 2)


def test_a_refused_create_deletes_the_created_members_so_none_hold_resources():
    pods = [member(0, "Pending", node=None), member(1, "Pending", node="node-a")]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(1),
                           create_refused="exceeded quota: gpus")
    assert decision.attempt_over and not decision.create_ranks
    assert names(decision) == [gang_pod_name("demo", "ppo", 0, 0), gang_pod_name("demo", "ppo", 0, 1)]
    assert "exceeded quota: gpus" in decision.message and "all 3" in decision.message


# ----------------------------------------------------------------------------- one ends, all end


def test_one_failed_member_deletes_the_others_and_ends_the_attempt_naming_its_failure():
    pods = [member(0), member(1, "Failed", exit_code=1, message="CUDA out of memory", finished=50), member(2)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(60))
    assert decision.state == "Restarting" and decision.attempt_over
    assert decision.failed is not None and decision.failed.rank == 1
    assert names(decision) == sorted(gang_pod_name("demo", "ppo", 0, r) for r in (0, 1, 2))
    assert "CUDA out of memory" in decision.message and "all 3 pods of attempt 0 are stopped" in decision.message
    assert not decision.create_ranks


def test_the_first_reported_failure_is_the_cause_not_the_peers_that_lost_it():
    pods = [member(0, "Failed", exit_code=1, message="gloo: connection closed by peer", finished=51),
            member(1, "Failed", exit_code=1, message="ValueError in reward function", finished=50),
            member(2, "Failed", exit_code=1, message="gloo: connection closed by peer", finished=52)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(60))
    assert decision.failed.rank == 1


def test_an_evicted_member_ends_the_attempt_as_a_disruption():
    pods = [member(0), member(1, "Failed", pod_reason="Evicted"), member(2)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(60))
    assert decision.attempt_over and decision.failed.rank == 1 and decision.failed.pod.disrupted


def test_a_member_deleted_from_outside_ends_the_attempt():
    pods = [member(0), member(1, deleted_at=55), member(2)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(60))
    assert decision.attempt_over and decision.failed.rank == 1
    # rank 1 is already being deleted: only its peers get a delete.
    assert names(decision) == sorted(gang_pod_name("demo", "ppo", 0, r) for r in (0, 2))


def test_a_member_that_vanished_after_the_gang_started_ends_the_attempt():
    decision = decide_gang(attempt=0, pods=[member(0), member(2)], settings=SETTINGS, now=at(60))
    assert decision.attempt_over and "rank 1" in decision.message
    assert not decision.create_ranks  # never re-create one rank into a running gang


def test_a_member_whose_node_stopped_reporting_is_lost_after_the_grace_period_only():
    pods = [member(0), member(1, not_ready_since=10), member(2)]
    assert decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(100)).state == "Running"
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(130))
    assert decision.attempt_over and decision.failed.rank == 1 and "stopped reporting" in decision.message
    assert not any(d.force for d in decision.deletes)  # graceful first: it may still be writing


def test_a_member_stuck_terminating_on_a_dead_node_is_force_deleted():
    pods = [member(0, deleted_at=0, not_ready_since=0)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(299))
    assert not decision.deletes
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(300))
    assert [(d.name, d.force) for d in decision.deletes] == [(gang_pod_name("demo", "ppo", 0, 0), True)]


def test_the_next_attempt_starts_all_ranks_only_after_every_old_pod_is_gone():
    leftover = [member(1, attempt=0, deleted_at=61)]
    decision = decide_gang(attempt=1, pods=leftover, settings=SETTINGS, now=at(62))
    assert decision.state == "WaitingForOldAttempt" and not decision.create_ranks
    assert decide_gang(attempt=1, pods=[], settings=SETTINGS, now=at(70)).create_ranks == (0, 1, 2)


def test_observed_pods_of_a_later_attempt_win_over_a_stale_recorded_attempt():
    pods = [member(r, attempt=2) for r in range(3)]
    assert decide_gang(attempt=1, pods=pods, settings=SETTINGS, now=at(5)).state == "Running"


# ----------------------------------------------------------------------------- placement


def test_partial_placement_reports_k_of_n_with_the_schedulers_message_and_a_requeue_at_the_timeout():
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pods = [member(0, "Pending"), member(1, "Pending", node=None, unschedulable=message), member(2, "Pending")]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(100))
    assert decision.state == "WaitingForPlacement"
    assert decision.placed == 2 and decision.unplaced == (1,)
    assert decision.message.startswith("2 of 3 pods placed") and message in decision.message
    assert decision.requeue_after == pytest.approx(500)
    assert not decision.deletes


def test_partial_placement_past_the_timeout_releases_every_member():
    pods = [member(0, "Pending"), member(1, "Pending", node=None, unschedulable="Insufficient nvidia.com/gpu"),
            member(2, "Running")]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(600))
    assert decision.state == "Released" and decision.attempt_over
    assert names(decision) == sorted(gang_pod_name("demo", "ppo", 0, r) for r in (0, 1, 2))
    assert decision.failed is None  # not the trainer's failure
    assert "released the 2 placed pod(s)" in decision.message


def test_a_gang_with_nothing_placed_waits_without_a_timeout_since_it_holds_nothing():
    pods = [member(r, "Pending", node=None, unschedulable="Insufficient nvidia.com/gpu") for r in range(3)]
    decision = decide_gang(attempt=0, pods=pods, settings=SETTINGS, now=at(10_000))
    assert decision.state == "WaitingForPlacement" and decision.message.startswith("0 of 3 pods placed")
    assert not decision.deletes and decision.requeue_after is None


def test_all_placed_is_starting_until_every_member_runs_then_running_then_succeeded():
    starting = [member(0), member(1, "Pending"), member(2)]
    assert decide_gang(attempt=0, pods=starting, settings=SETTINGS, now=at(5)).state == "Starting"
    assert decide_gang(attempt=0, pods=[member(r) for r in range(3)], settings=SETTINGS, now=at(5)).message \
        == "3 of 3 pods running"
    done = [member(r, "Succeeded", exit_code=0) for r in range(3)]
    assert decide_gang(attempt=0, pods=done, settings=SETTINGS, now=at(5)).state == "Succeeded"


# ----------------------------------------------------------------------------- rendezvous


def test_each_member_gets_the_rendezvous_torchrun_reads_and_the_expected_world_size():
    env = {e["name"]: e["value"] for e in rendezvous_env(run="demo", namespace="team-a", stage="ppo", attempt=3,
                                                          rank=1, nodes=2, processes_per_node=4, port=29400,
                                                          rendezvous_timeout_seconds=60)}
    address = "demo-ppo-3.team-a.svc"
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == address == master_address("demo", "team-a", "ppo", 3)
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29400"
    assert env["NNODES"] == env["PET_NNODES"] == "2"
    assert env["NODE_RANK"] == env["PET_NODE_RANK"] == "1"
    assert env["NPROC_PER_NODE"] == env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_RDZV_CONF"] == "timeout=60"
    assert env["FINETUNE_EXPECTED_WORLD_SIZE"] == "8"
    assert "RANK" not in env and "WORLD_SIZE" not in env  # torchrun sets these per process


def test_the_rendezvous_service_is_headless_publishes_not_ready_rank_0_of_its_attempt_only(run):
    service = rendezvous_service(run, stage="ppo", attempt=3, port=29400)
    assert service["metadata"]["name"] == "demo-ppo-3"
    assert service["metadata"]["ownerReferences"][0]["uid"] == run.uid
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    rank0 = gang_pod_labels("demo", "ppo", 3, 0, 2)
    assert spec["selector"].items() <= rank0.items()
    assert not spec["selector"].items() <= gang_pod_labels("demo", "ppo", 3, 1, 2).items()
    assert not spec["selector"].items() <= gang_pod_labels("demo", "ppo", 2, 0, 2).items()
    assert spec["ports"] == [{"name": "rendezvous", "port": 29400, "targetPort": 29400, "protocol": "TCP"}]


@pytest.mark.parametrize("run_name", ["7b.finetune", "x" * 80, "a.b.c"])
def test_the_service_name_is_a_dns_1035_label_for_any_run_name(run_name):
    name = rendezvous_service_name(run_name, "reward", 12)
    assert len(name) <= 63 and name[0].isalpha() and "." not in name and name.endswith("-reward-12")


def test_gang_pods_are_named_and_labelled_per_rank():
    assert gang_pod_name("demo", "sft", 0, 1) == "demo-sft-0-1"
    labels = gang_pod_labels("demo", "sft", 0, 1, 2)
    assert labels[LABEL_RANK] == "1" and labels[naming.LABEL_ATTEMPT] == "0"


def test_gang_scheduler_metadata_names_the_group_and_its_size():
    kueue = gang_scheduler_metadata(scheduler="kueue", group="demo-ppo-3", nodes=4)
    assert kueue == {"labels": {"kueue.x-k8s.io/pod-group-name": "demo-ppo-3"},
                     "annotations": {"kueue.x-k8s.io/pod-group-total-count": "4"}}
    assert gang_scheduler_metadata(scheduler="coscheduling", group="g", nodes=2)["labels"] == {
        "scheduling.x-k8s.io/pod-group": "g"}
    assert gang_scheduler_metadata(scheduler="volcano", group="g", nodes=2)["annotations"] == {
        "scheduling.k8s.io/group-name": "g"}
    with pytest.raises(ValueError, match="kueue, coscheduling or volcano"):
        gang_scheduler_metadata(scheduler="yunikorn", group="g", nodes=2)  # type: ignore[arg-type]
