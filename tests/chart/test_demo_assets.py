"""The demo's toy data fit examples/tiny-cpu.yaml and teach what its PPO stage rewards (no cluster, no torch)."""

from __future__ import annotations

import sys

import yaml
from chartlib import REPO

sys.path.insert(0, str(REPO / "hack"))
import demo_assets  # noqa: E402

SPEC = next(d for d in yaml.safe_load_all((REPO / "examples" / "tiny-cpu.yaml").read_text())
            if d and d.get("kind") == "FineTuneRun")["spec"]
STAGES = SPEC["stages"]


def test_sft_data_is_one_pass_of_the_example_sft_steps():
    sft = STAGES["sft"]
    assert len(demo_assets.sft_rows()) == sft["maxSteps"] * sft["batchSize"]


def test_sft_answers_are_two_vocabulary_words_so_the_preferred_word_is_rare_but_present():
    answers = [row["completion"].split() for row in demo_assets.sft_rows()]
    assert all(len(words) == 2 and set(words) <= set(demo_assets.WORDS) for words in answers)
    share = sum(demo_assets.PREFERRED_WORD in words for words in answers) / len(answers)
    assert 0.05 < share < 0.2, share  # ~1 - (19/20)^2 = 0.0975


def test_every_preference_pair_prefers_the_rewarded_word():
    rewarded = {k.lower() for f in STAGES["reward"]["functions"] if f["type"] == "keywords" for k in f["keywords"]}
    assert rewarded == {demo_assets.PREFERRED_WORD}
    for row in demo_assets.preference_rows():
        assert demo_assets.PREFERRED_WORD in row["chosen"].split()
        assert demo_assets.PREFERRED_WORD not in row["rejected"].split()


def test_prompts_cover_the_held_out_samples_and_a_training_batch():
    ppo = STAGES["ppo"]
    prompts = demo_assets.prompt_rows()
    assert len({row["prompt"] for row in prompts}) == len(prompts)
    assert len(prompts) >= ppo["samplePrompts"] + ppo["batchSize"]


def test_datasets_are_rewritten_only_when_their_content_changes(tmp_path):
    path = tmp_path / "prompts.jsonl"
    assert demo_assets.write_jsonl(path, demo_assets.prompt_rows()) is True
    assert demo_assets.write_jsonl(path, demo_assets.prompt_rows()) is False
    path.write_text('{"prompt": "stale"}\n')
    assert demo_assets.write_jsonl(path, demo_assets.prompt_rows()) is True
