"""benchmarks/real_model_stages.py runs the real-model example's stages with the StageJobs the operator
writes, moved from pod paths into a local directory (no training here: the mapping only)."""

from __future__ import annotations

import importlib.util

from chartlib import REPO


def load_benchmark():
    spec = importlib.util.spec_from_file_location("real_model_stages", REPO / "benchmarks" / "real_model_stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_jobs_are_the_examples_with_every_pod_path_under_the_work_directory(tmp_path):
    bench = load_benchmark()
    run = bench.example_run()
    jobs = bench.stage_jobs(run["spec"], pvc_root=tmp_path)
    sft, reward, ppo = jobs["sft"], jobs["reward"], jobs["ppo"]
    assert sft["model"] == str(tmp_path / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert sft["data"]["sft"] == str(tmp_path / "datasets/smollm2/sft.jsonl")
    assert reward["model"] == ppo["model"] == sft["outputDir"] + "/final"
    assert ppo["rewardModel"] == reward["outputDir"] + "/final"
    assert sft["outputDir"].startswith(str(tmp_path / run["spec"]["artifacts"]["pvc"]))
    for job in jobs.values():
        assert job["reporting"]["metricsPort"] is None and "progressConfigMap" not in job["reporting"]
        settings = job[job["stage"]]
        assert settings["learningRate"] == run["spec"]["stages"][job["stage"]]["learningRate"]
