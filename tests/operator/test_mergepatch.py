"""The status patch the reconciler sends is the minimal JSON merge patch."""

from __future__ import annotations

from ftoperator.mergepatch import apply, diff


def test_diff_sends_only_changes_and_nulls_for_removed_keys():
    old = {"state": "Running", "stages": {"sft": {"state": "Running", "metrics": {"loss": 1.0}}, "reward": {"a": 1}},
           "conditions": [{"type": "Running"}], "message": "x"}
    new = {"state": "Running", "stages": {"sft": {"state": "Succeeded", "metrics": {"loss": 1.0}}},
           "conditions": [{"type": "Running"}, {"type": "Failed"}]}
    patch = diff(old, new)
    assert patch == {"stages": {"sft": {"state": "Succeeded"}, "reward": None},
                     "conditions": [{"type": "Running"}, {"type": "Failed"}], "message": None}
    assert apply(old, patch) == new


def test_no_change_no_patch():
    document = {"a": {"b": [1, 2]}, "c": 1}
    assert diff(document, dict(document)) == {}
