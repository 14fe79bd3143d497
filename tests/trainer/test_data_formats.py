"""Dataset files and row formats: Parquet, gzip, JSON, CSV, directories of shards, and TRL's
conversational, implicit-prompt and prompt-only rows; bad rows still name FILE:LINE (or FILE:row N)."""

from __future__ import annotations

import gzip
import json

import pytest

from trainer.data import (
    IGNORE_INDEX, DatasetError, encode_text, load_preference_rows, load_prompt_rows, load_sft_rows, render_prompt,
    tokenize_sft_row,
)
from trainer.modeling import load_tokenizer

from .stage_runs import progress_events, run_in_process, write_job, write_jsonl

ROWS = [{"prompt": f"Tell me about {w}?", "completion": f" {w} is nice!"} for w in ("cats", "dogs", "weather")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "json-array", "json-array.gz", "json-lines-in-.json",
                                  "csv", "csv.gz", "shards", "no-suffix-parquet"])
def test_every_file_format_gives_the_same_rows(tmp_path, tokenizer, kind):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    elif kind == "jsonl.gz":
        path = tmp_path / "sft.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    elif kind == "parquet":
        path = write_parquet(tmp_path / "sft.parquet", ROWS)
    elif kind == "no-suffix-parquet":  # recognised by its content, not its name
        path = write_parquet(tmp_path / "sft.data", ROWS)
    elif kind == "json-array":
        path = tmp_path / "sft.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "json-array.gz":
        path = tmp_path / "sft.json.gz"
        path.write_bytes(gzip.compress(json.dumps(ROWS, indent=1).encode()))
    elif kind == "json-lines-in-.json":  # what `datasets`' json loader also accepts
        path = write_jsonl(tmp_path / "sft.json", ROWS)
    elif kind == "csv":
        path = write_csv(tmp_path / "sft.csv", ROWS)
    elif kind == "csv.gz":
        path = tmp_path / "sft.csv.gz"
        path.write_bytes(gzip.compress(write_csv(tmp_path / "plain.csv", ROWS).read_bytes()))
    else:  # shards in name order; other files (a README, Spark's _SUCCESS) are ignored
        path = tmp_path / "shards"
        path.mkdir()
        write_jsonl(path / "part-00000.jsonl", ROWS[:1])
        write_parquet(path / "part-00001.parquet", ROWS[1:2])
        (path / "part-00002.jsonl.gz").write_bytes(gzip.compress((json.dumps(ROWS[2]) + "\n").encode()))
        (path / "README.md").write_text("not data")
        (path / "_SUCCESS").write_text("")
    rows = load_sft_rows(path, tokenizer=tokenizer)
    assert [(r.prompt, r.completion) for r in rows] == [(r["prompt"], r["completion"]) for r in ROWS]


def test_bad_rows_name_the_file_and_line_or_row_in_every_format(tmp_path, tokenizer):
    bad = ROWS[:1] + [{"prompt": "no completion"}]
    parquet = write_parquet(tmp_path / "sft.parquet", bad)
    with pytest.raises(DatasetError, match=rf"^{parquet}:row 2: missing field 'completion'$"):
        load_sft_rows(parquet, tokenizer=tokenizer)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", ROWS)
    write_jsonl(shards / "b.jsonl", ["", {"prompt": "x", "completion": 3}])
    with pytest.raises(DatasetError, match=rf"^{shards / 'b.jsonl'}:2: field 'completion' must be a string"):
        load_sft_rows(shards, tokenizer=tokenizer)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "ok"}\n{"prompt": \n'))
    with pytest.raises(DatasetError, match=rf"^{gz}:2: not valid JSON"):
        load_prompt_rows(gz)
    csv_path = write_csv(tmp_path / "prefs.csv", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}])
    with pytest.raises(DatasetError, match=rf"^{csv_path}:2: field 'margin' must be a number"):
        load_preference_rows(csv_path)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 10)
    with pytest.raises(DatasetError, match="not UTF-8 text .* JSON Lines, JSON, CSV or Parquet"):
        load_prompt_rows(binary)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="directory holds no data files"):
        load_prompt_rows(tmp_path / "empty")


def test_csv_margins_are_numbers(tmp_path):
    path = write_csv(tmp_path / "prefs.csv", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "1.5"}])
    assert load_preference_rows(path)[0].margin == 1.5


def test_conversational_preferences_are_scored_as_rendered_prompt_plus_reply(tmp_path, tokenizer):
    user = [{"role": "user", "content": "hello"}]
    good, bad = [{"role": "assistant", "content": "hello world"}], [{"role": "assistant", "content": "go away"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": user, "chosen": good, "rejected": bad},
        {"chosen": user + good, "rejected": user + bad},  # implicit prompt: the common first messages
        {"chosen": "hello world", "rejected": "go away"},  # implicit prompt, standard: scored whole
    ])
    explicit, implicit, plain = load_preference_rows(path, tokenizer=tokenizer)
    assert (explicit.prompt, explicit.chosen, explicit.rejected) == ("<|user|>hello<|assistant|>", "hello world",
                                                                      "go away")
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == (explicit.prompt, explicit.chosen,
                                                                      explicit.rejected)
    assert (plain.prompt, plain.chosen, plain.rejected) == ("", "hello world", "go away")


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "fields prompt, chosen, rejected must be all strings or all message lists"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "must start with the same prompt messages and then differ"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"prompt\[0\]: role 'robot' is not one of"),
])
def test_bad_conversational_preferences_say_why(tmp_path, tokenizer, row, reason):
    path = write_jsonl(tmp_path / "prefs.jsonl", [row])
    with pytest.raises(DatasetError, match=f"prefs.jsonl:1: .*{reason}"):
        load_preference_rows(path, tokenizer=tokenizer)


def trained_text(example, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "and cats?"},
        {"role": "assistant", "content": "cats is nice"}]


def test_multi_turn_chats_train_every_assistant_turn_when_asked(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT}])
    (last,) = load_sft_rows(path, tokenizer=tokenizer)
    (every,) = load_sft_rows(path, tokenizer=tokenizer, assistant_turns="all")
    assert trained_text(tokenize_sft_row(last, tokenizer=tokenizer, max_length=512), tokenizer) == ["cats is nice</s>"]
    example = tokenize_sft_row(every, tokenizer=tokenizer, max_length=512)
    assert trained_text(example, tokenizer) == ["hello world</s>", "cats is nice</s>"]  # one EOS each, none added
    assert tokenizer.decode(example.input_ids).count("</s>") == 3  # system, two assistant turns


def test_conversational_prompt_completion_and_tool_messages(tmp_path, tokenizer):
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                                 "function": {"name": "weather", "arguments": {}}}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": [{"role": "user", "content": "weather today?"}], "completion": [
            call, {"role": "tool", "content": "sad"}, {"role": "assistant", "content": "very sad"}]}])
    (row,) = load_sft_rows(path, tokenizer=tokenizer)
    assert row.trained == (1, 3) and row.messages[1]["tool_calls"]  # the tool call is kept for the template
    example = tokenize_sft_row(row, tokenizer=tokenizer, max_length=512)
    assert trained_text(example, tokenizer)[-1] == "very sad</s>"
    assert "<|tool|>sad</s>" in tokenizer.decode(example.input_ids)  # context, not trained


def test_prompt_only_rows_and_the_chat_template_setting(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "hello", "answer": "4"}, {"prompt": [{"role": "system", "content": "be kind"},
                                                       {"role": "user", "content": "hello"}]}])
    text, chat = load_prompt_rows(path)
    assert text.fields == {"answer": "4"} and text.where == f"{path}:1"
    assert render_prompt(tokenizer, text.prompt, chat_template=True) == "<|user|>hello<|assistant|>"
    assert render_prompt(tokenizer, text.prompt, chat_template=False) == "hello"
    assert render_prompt(tokenizer, chat.prompt, chat_template=False) == "<|system|>be kind</s><|user|>hello<|assistant|>"


def test_a_bos_the_template_already_wrote_is_not_doubled(tokenizer):
    bos = tokenizer.bos_token
    ids = encode_text(tokenizer, f"{bos}hello")
    assert ids.count(tokenizer.bos_token_id) == 1


def test_sft_stage_reads_a_directory_of_parquet_and_gzip_shards(tmp_path, tiny_model_dir):
    shards = tmp_path / "sft"
    shards.mkdir()
    write_parquet(shards / "part-0.parquet", [{"messages": CHAT}] * 4)
    (shards / "part-1.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    job = {"stage": "sft", "model": str(tiny_model_dir), "outputDir": str(tmp_path / "out"), "data": {"sft": str(shards)},
           "sft": {"batchSize": 4, "maxSteps": 2, "assistantTurns": "all"}}
    assert run_in_process("sft", write_job(tmp_path / "job.yaml", **job)) == 0
    events = progress_events(tmp_path / "out")
    assert events[-1]["kind"] == "succeeded" and events[-1]["step"] == 2
    fingerprint = json.loads((tmp_path / "out" / "final" / "fingerprint.json").read_text())
    assert fingerprint["inputs"]["data.sft"].startswith("sha256:")  # a directory has a content digest too


def test_reward_stage_trains_on_conversational_preferences(tmp_path, tiny_model_dir):
    user = [{"role": "user", "content": "hello"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "hello world"}],
             "rejected": [{"role": "assistant", "content": f"go away {i}"}]} for i in range(6)]
    job = {"stage": "reward", "model": str(tiny_model_dir), "outputDir": str(tmp_path / "out"),
           "data": {"preferences": str(write_parquet(tmp_path / "prefs.parquet", rows))},
           "reward": {"batchSize": 2, "maxSteps": 2, "evalFraction": 0.2}}
    assert run_in_process("reward", write_job(tmp_path / "job.yaml", **job)) == 0
    assert progress_events(tmp_path / "out")[-1]["kind"] == "succeeded"


def test_ppo_gives_text_prompts_through_the_chat_template_by_default(tmp_path, tiny_model_dir):
    from .test_ppo import ppo_job, samples_by_step

    job = ppo_job(tmp_path, tiny_model_dir, output="out", steps=1, sampleEverySteps=1, checkpointEverySteps=100)
    del job["ppo"]["chatTemplate"]  # the default
    assert run_in_process("ppo", write_job(tmp_path / "job.yaml", **job)) == 0
    prompts = [s["prompt"] for s in samples_by_step(tmp_path / "out")[1]]
    assert prompts and all(p.startswith("<|user|>") and p.endswith("?<|assistant|>") for p in prompts), prompts
