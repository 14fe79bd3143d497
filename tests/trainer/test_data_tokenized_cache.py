"""SFT data is tokenised once per stage: batched, on the main process, cached under outputDir/tokenized."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trainer import data
from trainer.data import load_sft_rows, sft_examples, tokenize_sft_row, tokenize_sft_rows

from .stage_runs import write_jsonl

ROWS = [{"prompt": f"Question {i}?", "completion": f" answer {i}"} for i in range(6)] + [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}]


class Accelerator(SimpleNamespace):
    """The two things sft_examples needs from accelerate, with a count of barriers."""

    def wait_for_everyone(self) -> None:
        self.barriers += 1


def main_process() -> Accelerator:
    return Accelerator(is_main_process=True, barriers=0)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the tokenising function the cache wraps."""
    calls = []
    real = data.tokenize_sft_rows

    def tokenize(rows, **kwargs):
        calls.append(len(rows))
        return real(rows, **kwargs)

    monkeypatch.setattr(data, "tokenize_sft_rows", tokenize)
    return calls


def examples(path, tokenizer, cache_dir, *, accelerator=None, log=None, max_length=64):
    return sft_examples(path, tokenizer=tokenizer, max_length=max_length, assistant_turns="last",
                        cache_dir=cache_dir, accelerator=accelerator or main_process(), log=log or (lambda m: None))


def test_batched_tokenisation_gives_each_row_what_tokenising_it_alone_gives(tmp_path, tokenizer):
    rows = load_sft_rows(write_jsonl(tmp_path / "sft.jsonl", ROWS), tokenizer=tokenizer)
    assert tokenize_sft_rows(rows, tokenizer=tokenizer, max_length=16) == [
        tokenize_sft_row(row, tokenizer=tokenizer, max_length=16) for row in rows]


def test_a_second_run_or_retry_reuses_the_cache_instead_of_tokenising_again(tmp_path, tokenizer, counted):
    path, cache = write_jsonl(tmp_path / "sft.jsonl", ROWS), tmp_path / "out" / "tokenized"
    first = examples(path, tokenizer, cache)
    log = []
    second = examples(path, tokenizer, cache, log=log.append)
    assert counted == [len(ROWS)], "tokenised once"
    assert second == first and len(list(cache.glob("*.json"))) == 1
    assert log == [f"{path}: {len(ROWS)} tokenised examples reused from {next(cache.glob('*.json'))}"]


def test_other_ranks_read_what_the_main_process_wrote_and_never_tokenise(tmp_path, tokenizer, counted):
    path, cache = write_jsonl(tmp_path / "sft.jsonl", ROWS), tmp_path / "tokenized"
    main = main_process()
    expected = examples(path, tokenizer, cache, accelerator=main)
    other = Accelerator(is_main_process=False, barriers=0)
    assert examples(path, tokenizer, cache, accelerator=other) == expected
    assert counted == [len(ROWS)] and main.barriers == other.barriers == 1


def test_changed_data_tokenizer_or_settings_tokenise_again(tmp_path, tokenizer, counted):
    path, cache = write_jsonl(tmp_path / "sft.jsonl", ROWS), tmp_path / "tokenized"
    examples(path, tokenizer, cache)
    write_jsonl(path, ROWS + [{"prompt": "One more?", "completion": " yes"}])
    assert len(examples(path, tokenizer, cache)) == len(ROWS) + 1
    tokenizer.chat_template = "{# another version #}" + tokenizer.chat_template  # renders the same text
    examples(path, tokenizer, cache)
    examples(path, tokenizer, cache, max_length=32)
    assert counted == [len(ROWS), len(ROWS) + 1, len(ROWS) + 1, len(ROWS) + 1]
    assert len(list(cache.glob("*.json"))) == 4
    key = json.loads(sorted(cache.glob("*.json"))[0].read_text())["key"]
    assert key["data"].startswith("sha256:") and key["tokenizer"].startswith("sha256:")


def test_a_bad_row_still_fails_with_its_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", ROWS[:2] + [{"question": "no prompt"}])
    with pytest.raises(data.DatasetError, match=r"sft.jsonl:3"):
        examples(path, tokenizer, tmp_path / "tokenized")
