"""Reward model: Bradley-Terry learns a clear preference; function-only and misconfigured stages."""

from __future__ import annotations

import json
import re

import torch

from trainer.reward_model import bradley_terry_loss

from .stage_runs import progress_events, run_in_process, write_job, write_jsonl

TOPICS = "cats dogs weather today world model answer question reply tomorrow".split()
POLITE = ["Sure, thanks! {} is nice.", "Yes please, {} is good.", "Thanks, I love {}, kind of you."]
RUDE = ["No. {} is awful.", "I hate {}, never ask.", "What a terrible {}, go away."]


def preference_rows(count: int = 48) -> list[dict]:
    """Chosen replies are polite, rejected ones rude; topic and phrasing vary so it is not one fixed string."""
    rows = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        other = TOPICS[(i * 7 + 3) % len(TOPICS)]
        rows.append({"prompt": f"Tell me about {topic}? ",
                     "chosen": POLITE[i % 3].format(other), "rejected": RUDE[(i // 3) % 3].format(other)})
    return rows


def reward_job(tmp_path, model_dir, *, output="out", **reward) -> dict:
    settings = {"learningRate": 1e-3, "batchSize": 8, "epochs": 3, "evalFraction": 0.25,
                "checkpointEverySteps": 100, "logEverySteps": 3}
    settings.update(reward)
    return {"stage": "reward", "model": str(model_dir), "outputDir": str(tmp_path / output),
            "data": {"preferences": str(write_jsonl(tmp_path / "prefs.jsonl", preference_rows()))},
            "reward": settings}


def test_bradley_terry_loss_matches_definition():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    margin = torch.tensor([0.5, 0.0])
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean() \
        + 0.01 * ((chosen + rejected) ** 2).mean()
    assert torch.allclose(bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=0.01), expected)
    # Equal scores: log 2, the loss of a coin flip.
    assert torch.isclose(bradley_terry_loss(torch.zeros(3), torch.zeros(3)), torch.log(torch.tensor(2.0)))


def test_reward_model_learns_a_clear_preference(tmp_path, tiny_model_dir, capfd):
    from transformers import AutoModelForSequenceClassification

    config = write_job(tmp_path / "job.yaml", **reward_job(tmp_path, tiny_model_dir))
    assert run_in_process("reward", config) == 0
    # The log is never silent between the last step and the end: the normalisation pass and the save say so.
    log = capfd.readouterr().err
    assert re.search(r"Z \[reward\] scoring the \d+ training responses for reward_normalization.json\n", log), log
    assert re.search(r"Z \[reward\] score mean .*, std .* \(\d+ s\); saving final/\n", log), log

    events = progress_events(tmp_path / "out")
    accuracy = [e["metrics"]["reward_model_accuracy"] for e in events
                if "reward_model_accuracy" in e.get("metrics", {})][-1]
    # 12 held-out pairs, fixed seeds, deterministic CPU math: measured 1.0 with a mean margin of
    # several units. 0.75 (9 of 12) is far above chance (0.5) yet far below what the run reaches.
    assert accuracy >= 0.75, events[-3:]
    final = tmp_path / "out" / "final"
    stats = json.loads((final / "reward_normalization.json").read_text())
    assert set(stats) == {"mean", "std"} and stats["std"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0


def test_functions_only_reward_stage_writes_just_the_functions(tmp_path):
    functions = [{"type": "length", "targetLengthTokens": 20}, {"type": "keywords", "keywords": ["thanks"]}]
    job = {"stage": "reward", "model": str(tmp_path / "no-model-needed"), "outputDir": str(tmp_path / "out"),
           "reward": {"functions": functions}}
    assert run_in_process("reward", write_job(tmp_path / "job.yaml", **job)) == 0
    final = tmp_path / "out" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["COMPLETE", "fingerprint.json", "reward_functions.json"]
    saved = json.loads((final / "reward_functions.json").read_text())["functions"]
    assert saved[0] == {"type": "length", "weight": 1.0, "targetLengthTokens": 20}


def test_reward_stage_without_data_or_functions_fails_clearly(tmp_path):
    job = {"stage": "reward", "model": str(tmp_path), "outputDir": str(tmp_path / "out")}
    assert run_in_process("reward", write_job(tmp_path / "job.yaml", **job)) == 3  # permanent: no retry helps
    assert (tmp_path / "termination-log").read_text() == (
        "PermanentError: reward stage needs data.preferences or reward.functions")
    assert progress_events(tmp_path / "out")[-1]["kind"] == "failed"


def test_margin_loss_uses_the_rows_margin_field(tmp_path, tiny_model_dir):
    rows = [dict(r, margin=1.0) for r in preference_rows(8)]
    job = reward_job(tmp_path, tiny_model_dir, marginLoss=True, epochs=1, evalFraction=0.0)
    job["data"]["preferences"] = str(write_jsonl(tmp_path / "m.jsonl", rows))
    assert run_in_process("reward", write_job(tmp_path / "job.yaml", **job)) == 0
