"""The real-model example's data (hack/demo_assets_smollm2.py) fit examples/smollm2-cpu.yaml and teach
what its PPO stage is checked on (no cluster, no torch)."""

from __future__ import annotations

import sys

import yaml
from chartlib import REPO

sys.path.insert(0, str(REPO / "hack"))
import demo_assets_smollm2 as assets  # noqa: E402

SPEC = next(d for d in yaml.safe_load_all((REPO / "examples" / "smollm2-cpu.yaml").read_text())
            if d and d.get("kind") == "FineTuneRun")["spec"]


def test_the_rule_tells_positive_answers_from_negative_ones():
    for topic in ("frogs", "tea"):
        assert all(assets.is_positive(form.format(t=topic, T=topic.capitalize())) for form in assets.POSITIVE)
        assert not any(assets.is_positive(form.format(t=topic, T=topic.capitalize())) for form in assets.NEGATIVE)
    assert not assets.is_positive("") and not assets.is_positive("I dislike frogs")


def test_sft_answers_are_positive_and_negative_in_equal_parts_so_ppo_has_room():
    answers = [row["messages"][-1]["content"] for row in assets.sft_rows()]
    assert sum(map(assets.is_positive, answers)) * 2 == len(answers)


def test_every_preference_pair_prefers_the_positive_answer():
    for row in assets.preference_rows():
        assert assets.is_positive(row["chosen"][0]["content"]) and not assets.is_positive(row["rejected"][0]["content"])


def test_the_held_out_prompts_come_first_and_ask_about_topics_never_trained_on():
    prompts = [row["prompt"] for row in assets.prompt_rows()]
    held_out = prompts[:SPEC["stages"]["ppo"]["samplePrompts"]]
    assert held_out == assets.held_out_prompts()
    assert not set(assets.HELD_OUT_TOPICS) & set(assets.TOPICS)
    trained = [row["messages"][0]["content"] for row in assets.sft_rows()] + prompts[len(held_out):] + [
        row["prompt"][0]["content"] for row in assets.preference_rows()]
    assert not any(topic in text.split() or f"{topic}?" in text or f"{topic}." in text
                   for topic in assets.HELD_OUT_TOPICS for text in trained)
