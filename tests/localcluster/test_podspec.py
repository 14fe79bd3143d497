"""Pure pod-spec helpers of the node agent (no cluster needed)."""

import pytest

from localcluster import podspec

POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
       "spec": {"nodeName": "local-gpu-0"}}


def test_expand_replaces_defined_variables_and_keeps_unknown_and_escaped_ones():
    env = {"A": "1"}
    assert podspec.expand("$(A)-$(B)-$$(A)", env) == "1-$(B)-$(A)"


def test_container_env_resolves_field_config_map_and_secret_refs_in_order():
    container = {"env": [
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "lr"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t", "optional": True}}},
        {"name": "MSG", "value": "$(POD) at $(IP)"},
    ]}
    env = podspec.container_env(
        POD, container, base_env={"PATH": "/bin"},
        read_config_map=lambda ns, name, key: {"lr": "0.1"}.get(key),
        read_secret=lambda ns, name, key: None,
    )
    assert env == {"PATH": "/bin", "POD": "p", "IP": "127.0.0.1", "LR": "0.1", "TOKEN": "",
                   "MSG": "p at 127.0.0.1"}


def test_missing_required_reference_makes_the_pod_wait():
    container = {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    with pytest.raises(podspec.MissingReference, match="Secret ns/s"):
        podspec.container_env(POD, container, base_env={},
                              read_config_map=lambda *a: None, read_secret=lambda *a: None)


def test_termination_message_falls_back_to_log_tail_only_on_error():
    log = "\n".join(f"line {i}" for i in range(200))
    fallback = podspec.termination_message(message_file="", log_tail=log, exit_code=1,
                                           policy="FallbackToLogsOnError")
    assert fallback.splitlines()[-1] == "line 199" and len(fallback.splitlines()) == 80
    assert podspec.termination_message(message_file="", log_tail=log, exit_code=0,
                                       policy="FallbackToLogsOnError") == ""
    assert podspec.termination_message(message_file="boom", log_tail=log, exit_code=1,
                                       policy="File") == "boom"


def test_restart_policy_decisions():
    assert podspec.should_restart(restart_policy="Always", exit_code=0)
    assert podspec.should_restart(restart_policy="OnFailure", exit_code=2)
    assert not podspec.should_restart(restart_policy="OnFailure", exit_code=0)
    assert not podspec.should_restart(restart_policy="Never", exit_code=2)
    assert podspec.finished_phase([0, 0]) == "Succeeded"
    assert podspec.finished_phase([0, 1]) == "Failed"
