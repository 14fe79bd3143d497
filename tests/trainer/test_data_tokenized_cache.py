"""Datasets are tokenised once per stage (SFT, reward, DPO): batched, on the main process, cached under outputDir/tokenized."""

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
    assert log == [f"{path}: {len(ROWS)} examples tokenised earlier, reused from {next(cache.glob('*.json'))}"]


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


PAIRS = [{"prompt": f"Question {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(8)] + [
    {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
     "rejected": [{"role": "assistant", "content": "Go away"}]}]


def preference_ctx(tmp_path, path, stage: str, accelerator=None, **settings):
    """What the reward and DPO stages' encoded_pairs read from their StageContext."""
    from trainer.config import StageJob

    job = StageJob.model_validate({"stage": stage, "model": "m", "outputDir": str(tmp_path / "out"),
                                   "data": {"preferences": str(path)}, stage: settings})
    return SimpleNamespace(job=job, output_dir=tmp_path / "out", accelerator=accelerator or main_process())


@pytest.fixture
def preference_reads(monkeypatch):
    """Counts reads of the preference file by either stage."""
    from trainer import dpo, reward_model

    calls = []
    for module in (reward_model, dpo):
        real = module.load_preference_rows

        def load(path, _real=real, **kwargs):
            calls.append(path)
            return _real(path, **kwargs)

        monkeypatch.setattr(module, "load_preference_rows", load)
    return calls


def test_reward_pairs_are_encoded_once_and_reused_by_a_retry_or_another_rank(tmp_path, tokenizer, preference_reads):
    from trainer.data import load_preference_rows
    from trainer.reward_model import encode_pairs, encoded_pairs

    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    expected = encode_pairs(load_preference_rows(path, tokenizer=tokenizer), tokenizer=tokenizer, max_length=32)
    preference_reads.clear()
    first = encoded_pairs(preference_ctx(tmp_path, path, "reward", maxSeqLengthTokens=32), tokenizer)
    other = Accelerator(is_main_process=False, barriers=0)
    again = encoded_pairs(preference_ctx(tmp_path, path, "reward", other, maxSeqLengthTokens=32), tokenizer)
    assert first == again == expected and other.barriers == 1
    assert preference_reads == [str(path)], "read and encoded once"
    encoded_pairs(preference_ctx(tmp_path, path, "reward", maxSeqLengthTokens=16), tokenizer)
    assert len(preference_reads) == 2, "another maxSeqLengthTokens encodes anew"
    assert {json.loads(f.read_text())["key"]["kind"] for f in (tmp_path / "out" / "tokenized").glob("*.json")} == {
        "reward"}


def test_dpo_pairs_and_their_split_are_encoded_once(tmp_path, tokenizer, preference_reads):
    from trainer.data import load_preference_rows, split_for_eval
    from trainer.dpo import encode_pair, encoded_pairs

    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    settings = dict(maxSeqLengthTokens=48, evalFraction=0.25, seed=3)
    train_rows, eval_rows = split_for_eval(load_preference_rows(path, tokenizer=tokenizer), fraction=0.25, seed=3)
    preference_reads.clear()
    encode = dict(tokenizer=tokenizer, max_length=48, chat_template=True)
    for _ in range(2):
        train, held_out, shown = encoded_pairs(preference_ctx(tmp_path, path, "dpo", **settings), tokenizer)
        assert train == [encode_pair(r, **encode) for r in train_rows]
        assert held_out == [encode_pair(r, **encode) for r in eval_rows]
        assert shown == [(r.chosen, r.rejected) for r in eval_rows] and len(held_out) == 2
    assert preference_reads == [str(path)]
    encoded_pairs(preference_ctx(tmp_path, path, "dpo", **{**settings, "seed": 4}), tokenizer)
    assert len(preference_reads) == 2, "another split encodes anew"


def test_a_bad_preference_row_still_fails_with_its_file_and_line(tmp_path, tokenizer):
    from trainer.reward_model import encoded_pairs

    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS[:2] + [{"prompt": "no replies"}])
    with pytest.raises(data.DatasetError, match=r"prefs.jsonl:3"):
        encoded_pairs(preference_ctx(tmp_path, path, "reward"), tokenizer)
