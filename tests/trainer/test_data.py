"""Dataset validation (file:line errors) and SFT tokenisation (loss on completion tokens only)."""

from __future__ import annotations

import pytest

from trainer.data import (
    IGNORE_INDEX, DatasetError, SFTRow, load_preference_rows, load_prompt_rows, load_sft_rows,
    split_for_eval, tokenize_sft_row,
)
from trainer.modeling import load_tokenizer

from .stage_runs import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("line, reason", [
    ('{"prompt": "hi", "completion": ', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object, got list"),
    ('{"prompt": "hi"}', "missing field 'completion'"),
    ('{"prompt": "hi", "completion": 3}', "field 'completion' must be a string, got int"),
    ('{"prompt": "  ", "completion": "yes"}', "field 'prompt' is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "role 'robot' is not one of"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "last message must have role 'assistant'"),
])
def test_bad_sft_row_names_file_line_and_reason(tmp_path, tokenizer, line, reason):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}, "", line])
    with pytest.raises(DatasetError) as err:
        load_sft_rows(path, tokenizer=tokenizer)
    assert str(err.value).startswith(f"{path}:3: ")  # line 3: the blank line 2 still counts
    assert reason in str(err.value)


def test_chat_rows_need_a_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(DatasetError, match=r"sft.jsonl:1: conversational rows \(message lists\) need a tokenizer with a chat template"):
        load_sft_rows(path, tokenizer=plain)
    assert len(load_sft_rows(path, tokenizer=tokenizer)) == 1


def test_blank_lines_are_skipped_and_counts_reported(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", ["", {"prompt": "one"}, "   ", {"prompt": "two"}, ""])
    assert [r.prompt for r in load_prompt_rows(path)] == ["one", "two"]
    assert f"{path}: using 2 prompt rows" in capsys.readouterr().err
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}, "", {"prompt": "c", "completion": "d"}])
    rows = load_sft_rows(sft, tokenizer=tokenizer)
    assert [r.where for r in rows] == [f"{sft}:1", f"{sft}:3"]
    assert f"{sft}: using 2 SFT rows" in capsys.readouterr().err


def test_preference_rows_validate_margin_and_fields(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2}])
    assert load_preference_rows(good)[0].margin == 2.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: field 'margin' must be a number"):
        load_preference_rows(bad)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DatasetError, match=r"missing.jsonl:1: missing field 'rejected'"):
        load_preference_rows(missing)


def test_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_prompt_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no rows"):
        load_prompt_rows(write_jsonl(tmp_path / "empty.jsonl", ["", ""]))


def test_loss_mask_covers_exactly_the_prompt_tokens(tokenizer):
    row = SFTRow(where="t:1", prompt="Tell me about cats?", completion=" Cats is nice!")
    example = tokenize_sft_row(row, tokenizer=tokenizer, max_length=512)
    prompt_ids = tokenizer("Tell me about cats?")["input_ids"]
    completion_ids = tokenizer(" Cats is nice!", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]


def test_chat_row_trains_on_the_last_assistant_message_only(tokenizer):
    messages = ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"})
    example = tokenize_sft_row(SFTRow(where="t:1", messages=messages, trained=(1,)), tokenizer=tokenizer,
                               max_length=512)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "hello world</s>"  # the template's </s> is the EOS, not doubled
    untrained = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert tokenizer.decode(untrained) == "<|user|>hello<|assistant|>"


def test_an_end_of_turn_followed_by_a_newline_gets_no_second_eos(tokenizer):
    """SmolLM2's and Qwen's templates end a turn with `<|im_end|>` then a newline: the EOS is trained once."""
    import copy

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = tokenizer.chat_template.replace("</s>", "</s>\n")
    messages = ({"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"})
    example = tokenize_sft_row(SFTRow(where="t:1", messages=messages, trained=(1,)), tokenizer=chat, max_length=512)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert trained.count(chat.eos_token_id) == 1 and example.input_ids.count(chat.eos_token_id) == 1
    assert chat.decode(trained) == "hello world</s>\n"


def test_truncation_keeps_half_the_budget_for_the_completion(tokenizer):
    row = SFTRow(where="t:1", prompt="the " * 40, completion="yes " * 40)
    example = tokenize_sft_row(row, tokenizer=tokenizer, max_length=16)
    assert len(example.input_ids) == 16
    assert sum(label != IGNORE_INDEX for label in example.labels) == 8


def test_eval_split_is_seeded_and_disjoint():
    rows = list(range(20))
    train, held = split_for_eval(rows, fraction=0.25, seed=3)
    assert (train, held) == split_for_eval(rows, fraction=0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == rows
