"""Condition helpers (metav1.Condition semantics) and deterministic child names."""

from __future__ import annotations

from datetime import timedelta

from ftoperator import naming
from ftoperator.conditions import find, parse_timestamp, set_condition, timestamp


def test_set_condition_appends_then_replaces_keeping_the_transition_time_while_status_holds(now):
    conditions = set_condition([], type_="Running", status="False", reason="NotRunning", now=now(), generation=1)
    conditions = set_condition(conditions, type_="Running", status="False", reason="Suspended", message="x",
                               now=now(5), generation=2)
    running = find(conditions, "Running")
    assert (running.reason, running.message, running.observed_generation) == ("Suspended", "x", 2)
    assert running.last_transition_time == timestamp(now())
    conditions = set_condition(conditions, type_="Running", status="True", reason="StageRunning", now=now(9),
                               generation=2)
    assert find(conditions, "Running").last_transition_time == timestamp(now(9))
    assert len(conditions) == 1


def test_timestamps_round_trip_in_utc_with_a_z(now):
    text = timestamp(now(1.7))
    assert text == "2025-01-01T12:00:01Z"
    assert parse_timestamp(text) == now(1)
    assert parse_timestamp("2025-01-01T13:00:00+01:00") == now()
    assert parse_timestamp("2025-01-01T12:00:00.250000Z") - now() == timedelta(milliseconds=250)


def test_pod_names_are_deterministic_and_short_names_are_kept():
    assert naming.pod_name("demo", "ppo", 3) == "demo-ppo-3"
    assert naming.pod_name("demo", "ppo", 3) == naming.pod_name("demo", "ppo", 3)


def test_long_run_names_are_truncated_with_a_hash_that_keeps_them_distinct():
    long_a = "a" * 80 + "-first"
    long_b = "a" * 80 + "-second"
    names = {naming.pod_name(long_a, "reward", 12), naming.pod_name(long_b, "reward", 12)}
    assert len(names) == 2
    assert all(len(name) <= 63 and name.endswith("-reward-12") for name in names)
    for name in (naming.progress_config_map_name(long_a), naming.trainer_service_account_name(long_a),
                 naming.stage_config_map_name(long_a, "sft"), naming.run_label_value(long_a)):
        assert len(name) <= 63


def test_pod_labels_select_run_stage_attempt_and_trainer_pods():
    labels = naming.pod_labels("demo", "sft", 1)
    assert labels["finetune.dev/run"] == "demo"
    assert labels["finetune.dev/stage"] == "sft"
    assert labels["finetune.dev/attempt"] == "1"
    assert labels["app.kubernetes.io/name"] == "finetune-trainer"
    assert naming.run_selector("demo") == "finetune.dev/run=demo"
