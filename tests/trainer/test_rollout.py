"""The machinery PPO, GRPO and RLOO share: prompt rows with extra fields, held-out split, seeds."""

from __future__ import annotations

import pytest

from trainer.data import DatasetError
from trainer.rollout import PromptRow, load_prompts, split_prompts

from .stage_runs import write_jsonl


def test_prompt_rows_keep_their_extra_fields_for_verifiable_rewards(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+2?", "answer": "4", "level": 1}, {"prompt": "hi"}])
    assert load_prompts(path) == [PromptRow("2+2?", {"answer": "4", "level": 1}), PromptRow("hi", {})]


def test_a_bad_prompt_row_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"answer": "4"}])
    with pytest.raises(DatasetError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        load_prompts(path)


def test_the_held_out_split_names_the_stage_setting():
    with pytest.raises(Exception, match="grpo.samplePrompts=2"):
        split_prompts(["a", "b"], held_out=2, source="p.jsonl", setting="grpo.samplePrompts")
