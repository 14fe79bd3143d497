"""Pure builders: stage pods, StageJob ConfigMaps and the per-run access objects."""

from __future__ import annotations

import yaml

from ftoperator.builders import (
    resolve_uri, run_infrastructure, stage_config_map, stage_job, stage_pod, trainer_command,
)
from ftoperator.config import OperatorConfig
from ftoperator.validation import parse_spec
from trainer.config import StageJob


def typed(raw):
    spec, errors = parse_spec(raw)
    assert not errors, errors
    return spec


def container_of(pod):
    return pod["spec"]["containers"][0]


def test_pvc_uris_map_to_read_only_data_mounts_and_the_artifacts_claim_to_artifacts():
    assert resolve_uri("pvc://datasets/a/b.jsonl", artifacts_claim="runs").path == "/data/datasets/a/b.jsonl"
    assert resolve_uri("pvc://datasets/a/b.jsonl", artifacts_claim="runs").claim == "datasets"
    on_artifacts = resolve_uri("pvc://runs/ns/old/ppo/final", artifacts_claim="runs")
    assert (on_artifacts.path, on_artifacts.claim) == ("/artifacts/ns/old/ppo/final", None)
    assert resolve_uri("hf://org/name", artifacts_claim="runs").path == "hf://org/name"
    assert resolve_uri("/opt/models/base", artifacts_claim="runs").claim is None
    assert resolve_uri("pvc://models", artifacts_claim="runs").path == "/data/models"


def test_stage_jobs_chain_the_models_and_are_readable_by_the_trainer(spec, run, config):
    typed_spec = typed(spec)
    sft = stage_job(typed_spec, run=run, stage="sft", config=config)
    assert sft.model == "/data/models/base-1b"
    assert sft.output_dir == "/artifacts/team-a/demo/sft"
    assert sft.data.sft == "/data/datasets/sft.jsonl"
    assert sft.reporting.progress_config_map == "demo-progress"
    assert sft.reporting.history_config_map == "demo-history"
    reward = stage_job(typed_spec, run=run, stage="reward", config=config)
    assert reward.model == "/artifacts/team-a/demo/sft/final"
    ppo = stage_job(typed_spec, run=run, stage="ppo", config=config)
    assert ppo.model == "/artifacts/team-a/demo/sft/final"
    assert ppo.reward_model == "/artifacts/team-a/demo/reward/final"
    assert ppo.ppo.steps == 500 and ppo.ppo.kl_coef == 0.05

    config_map = stage_config_map(typed_spec, run=run, stage="ppo", config=config)
    round_trip = StageJob.model_validate(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert round_trip == ppo
    assert config_map["metadata"]["name"] == "demo-ppo-job"
    assert config_map["metadata"]["ownerReferences"][0]["controller"] is True


def test_stage_pod_runs_the_trainer_with_its_config_volumes_and_resources(spec, run, config):
    pod = stage_pod(typed(spec), run=run, stage="sft", attempt=2, config=config)
    container = container_of(pod)
    assert pod["metadata"]["name"] == "demo-sft-2"
    assert pod["metadata"]["labels"]["finetune.dev/run"] == "demo"
    assert pod["metadata"]["labels"]["finetune.dev/stage"] == "sft"
    assert pod["metadata"]["labels"]["finetune.dev/attempt"] == "2"
    assert pod["metadata"]["ownerReferences"] == [{
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneRun", "name": "demo", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["serviceAccountName"] == "demo-trainer"
    assert container["image"] == "ghcr.io/example/trainer:1"
    assert container["command"] == ["python", "-m", "trainer", "--stage", "sft", "--config", "/etc/finetune/job.yaml"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {"/etc/finetune", "/artifacts/team-a/demo/sft", "/data/models", "/data/datasets",
                           "/tmp", "/dev/shm"}
    assert mounts["/data/models"]["readOnly"] and not mounts["/artifacts/team-a/demo/sft"].get("readOnly")
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"].get("readOnly", False)
              for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"runs": False, "models": True, "datasets": True}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["POD_NAMESPACE"] == "team-a" and env["FINETUNE_OUTPUT_DIR"] == "/artifacts/team-a/demo/sft"


def test_stage_resources_override_the_run_resources_field_by_field(spec, run, config):
    spec["resources"] = {"gpus": 1, "memory": "64Gi", "cpu": 8}
    spec["stages"]["ppo"]["resources"] = {"gpus": 4}
    container = container_of(stage_pod(typed(spec), run=run, stage="ppo", attempt=1, config=config))
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert container["command"][:4] == ["accelerate", "launch", "--num_processes", "4"]


def test_cpu_only_pod_has_no_gpu_resource_and_scheduling_constraints_pass_through(spec, run, config):
    spec["resources"] = {}
    spec["nodeSelector"] = {"pool": "train"}
    spec["tolerations"] = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod = stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config)
    assert "resources" not in container_of(pod)
    assert pod["spec"]["nodeSelector"] == {"pool": "train"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_operator_default_image_and_disabled_metrics_port(spec, run):
    del spec["image"]
    config = OperatorConfig(trainer_image="trainer:default", trainer_metrics_port=None)
    pod = stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config)
    assert container_of(pod)["image"] == "trainer:default"
    assert "ports" not in container_of(pod)
    assert stage_job(typed(spec), run=run, stage="sft", config=config).reporting.metrics_port is None


def test_benchmark_command_override_replaces_the_trainer(spec, run):
    config = OperatorConfig(trainer_image="x", stage_command_override="exit 0")
    assert container_of(stage_pod(typed(spec), run=run, stage="sft", attempt=1, config=config))["command"] == [
        "/bin/sh", "-c", "exit 0"]


def test_trainer_command_uses_accelerate_only_above_one_gpu():
    assert trainer_command("ppo", 0)[0] == "python"
    assert trainer_command("ppo", 1)[0] == "python"
    assert trainer_command("ppo", 2)[:4] == ["accelerate", "launch", "--num_processes", "2"]


def test_trainer_may_only_touch_its_own_progress_config_map(run):
    service_account, role, binding, progress, history = run_infrastructure(run)
    assert service_account["metadata"]["name"] == "demo-trainer"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["demo-progress", "demo-history"], "verbs": ["get", "patch", "update"]}]
    assert binding["roleRef"]["name"] == "demo-trainer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "team-a"}]
    assert progress["metadata"]["name"] == "demo-progress"
    assert progress["metadata"]["labels"]["app.kubernetes.io/component"] == "progress"
    # The console's metric history: its own ConfigMap (the operator does not watch it), owned by the run.
    assert history["metadata"]["name"] == "demo-history"
    assert history["metadata"]["labels"]["app.kubernetes.io/component"] == "history"
    for obj in (service_account, role, binding, progress, history):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_the_pod_tells_the_trainer_how_many_gpus_it_was_given(spec, run, config):
    from trainer.config import EXPECTED_GPUS_ENV

    from ftoperator.builders import stage_pod

    typed, _ = parse_spec(spec)
    pod = stage_pod(typed, run=run, stage="ppo", attempt=1, config=config)
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env[EXPECTED_GPUS_ENV] == "1"


# ----------------------------------------------------------------------------- the policy stage (issue 12)


def test_grpo_stage_job_carries_its_settings_the_reward_functions_and_the_reward_model(spec, run, config):
    spec["stages"].pop("ppo")
    spec["stages"]["reward"]["functions"] = [{"type": "numericAnswer", "answerField": "solution"}]
    spec["stages"]["grpo"] = {"algorithm": "rloo", "steps": 7, "batchSize": 8, "groupSize": 4, "klCoef": 0.02,
                              "resources": {"gpus": 2}}
    job = stage_job(typed(spec), run=run, stage="grpo", config=config)
    assert (job.stage, job.grpo.algorithm, job.grpo.steps, job.grpo.group_size, job.grpo.kl_coef) == (
        "grpo", "rloo", 7, 4, 0.02)
    assert job.model == "/artifacts/team-a/demo/sft/final"
    assert job.reward_model == "/artifacts/team-a/demo/reward/final"
    assert [f.answer_field for f in job.reward.functions] == ["solution"]
    assert job.data.model_dump(exclude_none=True) == {"prompts": "/data/datasets/prompts.jsonl"}

    pod = stage_pod(typed(spec), run=run, stage="grpo", attempt=1, config=config)
    assert pod["metadata"]["name"] == "demo-grpo-1"
    assert container_of(pod)["command"] == ["accelerate", "launch", "--num_processes", "2", "-m", "trainer",
                                            "--stage", "grpo", "--config", "/etc/finetune/job.yaml"]
    config_map = stage_config_map(typed(spec), run=run, stage="grpo", config=config)
    assert StageJob.model_validate(yaml.safe_load(config_map["data"]["job.yaml"])) == job


def test_dpo_stage_job_reads_only_the_preferences_and_starts_from_the_sft_output(spec, run, config):
    for stage in ("reward", "ppo"):
        spec["stages"].pop(stage)
    spec["stages"]["dpo"] = {"beta": 0.2, "lossType": "ipo", "maxSteps": 5}
    job = stage_job(typed(spec), run=run, stage="dpo", config=config)
    assert (job.dpo.beta, job.dpo.loss_type, job.dpo.max_steps) == (0.2, "ipo", 5)
    assert job.model == "/artifacts/team-a/demo/sft/final" and job.reward_model is None
    assert job.data.model_dump(exclude_none=True) == {"preferences": "/data/datasets/prefs.jsonl"}

    pod = stage_pod(typed(spec), run=run, stage="dpo", attempt=1, config=config)
    assert container_of(pod)["command"] == ["python", "-m", "trainer", "--stage", "dpo",
                                            "--config", "/etc/finetune/job.yaml"]
    mounts = {m["mountPath"] for m in container_of(pod)["volumeMounts"]}
    assert {"/artifacts/team-a/demo/dpo", "/artifacts/team-a/demo/sft/final", "/data/datasets"} <= mounts


def test_each_stage_gets_only_its_own_dataset_and_the_claims_it_needs(spec, run, config):
    spec["data"]["sft"] = "pvc://sft-data/sft.jsonl"
    jobs = {stage: stage_job(typed(spec), run=run, stage=stage, config=config) for stage in ("sft", "reward", "ppo")}
    assert {stage: job.data.model_dump(exclude_none=True) for stage, job in jobs.items()} == {
        "sft": {"sft": "/data/sft-data/sft.jsonl"},
        "reward": {"preferences": "/data/datasets/prefs.jsonl"},
        "ppo": {"prompts": "/data/datasets/prompts.jsonl"},
    }
    ppo = stage_pod(typed(spec), run=run, stage="ppo", attempt=1, config=config)
    claims = {v["persistentVolumeClaim"]["claimName"] for v in ppo["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"runs", "datasets"}, "neither the base model's claim nor the SFT data's"


def test_a_stage_that_does_not_run_has_no_job(spec, run, config):
    import pytest

    with pytest.raises(KeyError, match="stage grpo does not run"):
        stage_job(typed(spec), run=run, stage="grpo", config=config)
