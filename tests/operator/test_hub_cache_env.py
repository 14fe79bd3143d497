"""Stage pods keep hf:// downloads on the artifacts volume, unless the user put the Hub cache elsewhere."""

from __future__ import annotations

from ftoperator.builders import stage_pod
from ftoperator.validation import parse_spec


def env_of(raw_spec, run, config, stage: str) -> dict[str, dict]:
    spec, errors = parse_spec(raw_spec)
    assert not errors, errors
    pod = stage_pod(spec, run=run, stage=stage, attempt=1, config=config)
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_the_hub_cache_is_in_the_stage_output_directory_so_retries_reuse_downloads(spec, run, config):
    for stage in ("sft", "reward", "ppo"):
        env = env_of(spec, run, config, stage)
        assert env["HF_HUB_CACHE"]["value"] == f"/artifacts/team-a/demo/{stage}/hf-cache"


def test_a_user_hf_home_or_hub_cache_in_the_pod_template_wins(spec, run, config):
    for name in ("HF_HOME", "HF_HUB_CACHE"):
        spec["podTemplate"] = {"env": [{"name": name, "value": "/models-cache"}]}
        env = env_of(spec, run, config, "sft")
        assert env[name]["value"] == "/models-cache"
        assert name == "HF_HUB_CACHE" or "HF_HUB_CACHE" not in env  # HF_HUB_CACHE would override HF_HOME's hub/
