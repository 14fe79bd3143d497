"""A fake cluster for the console: users with tokens, RBAC as a set of allowed (user, verb, resource,
namespace) tuples, runs, history ConfigMaps and created labels."""

from __future__ import annotations

import copy
import json

from ftconsole.kube import User


class FakeKube:
    def __init__(self):
        self.users = {"alice-token": User("alice", groups=["team-a"]), "bob-token": User("bob")}
        self.rules: set[tuple[str, str, str, str]] = set()  # (user, verb, resource, namespace or "*")
        self.runs: list[dict] = []
        self.config_maps: dict[tuple[str, str], dict] = {}
        self.labels: list[dict] = []
        self.reviews: list[tuple] = []

    def allow(self, user, verb, resource, namespace):
        self.rules.add((user, verb, resource, namespace))

    # the ConsoleKube interface
    def token_review(self, token):
        return self.users.get(token)

    def access_review(self, user, *, namespace, verb, resource, group, name=None):
        self.reviews.append((user.username, verb, resource, namespace, name))
        return ((user.username, verb, resource, namespace or "*") in self.rules
                or (user.username, verb, resource, "*") in self.rules)

    def list_runs(self, namespaces):
        return [copy.deepcopy(r) for r in self.runs if namespaces is None or r["metadata"]["namespace"] in namespaces]

    def get_run(self, namespace, name):
        return next((copy.deepcopy(r) for r in self.runs
                     if r["metadata"]["namespace"] == namespace and r["metadata"]["name"] == name), None)

    def config_map_data(self, namespace, name):
        return self.config_maps.get((namespace, name))

    def list_labels(self, namespace, *, run=None):
        return [obj for obj in self.labels if obj["metadata"]["namespace"] == namespace
                and (run is None or obj["spec"]["run"] == run)]

    def create_label(self, obj):
        created = copy.deepcopy(obj)
        created["metadata"]["name"] = f"{obj['metadata']['generateName']}{len(self.labels):05d}"
        self.labels.append(created)
        return created


def run_object(namespace, name, *, state="Running", message=None):
    status = {"state": state, "currentStage": "ppo", "progress": "ppo 20/100", "reward": 0.5, "kl": 0.02,
              "stages": {"sft": {"state": "Succeeded", "attempts": 1, "reason": "Completed"},
                         "ppo": {"state": state, "attempts": 2, "failures": 1, "reason": "PodFailed",
                                 "message": message or "OOMKilled"}}}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneRun",
            "metadata": {"namespace": namespace, "name": name, "creationTimestamp": "2026-12-01T10:00:00Z"},
            "spec": {}, "status": status}


def history_data(*, samples, steps=20):
    document = {"version": 1, "stages": {"ppo": {
        "series": {"kl": [[s, s / 100] for s in range(1, steps + 1)],
                   "score_mean": [[s, 0.1 * s, 0.0, 0.2 * s, 4] for s in range(1, steps + 1)]},
        "events": [{"kind": "started", "step": 0, "time": "2026-12-01T10:00:00Z"}]}}, "samples": samples}
    return {"history.json": json.dumps(document)}
