"""Datasets: reading (JSON Lines, JSON, Parquet, CSV, gzip, directories of shards), validation with
``FILE:LINE`` errors, and tokenisation.

Row formats are TRL's (https://huggingface.co/docs/trl/dataset_formats), standard (strings) and
conversational (lists of ``{"role", "content"}`` messages):

- SFT: ``{"prompt": str, "completion": str}``; ``{"messages": [...]}`` (the last message is an
  assistant's; ``assistantTurns`` says whether earlier assistant turns are trained too);
  ``{"prompt": [...], "completion": [...]}`` (the completion's assistant messages are trained).
- Preferences: ``{"prompt", "chosen", "rejected"}`` (strings, or message lists), optional numeric
  ``"margin"``; or implicit prompt: ``{"chosen", "rejected"}`` only, the prompt being their common start.
- Prompts (PPO): ``{"prompt": str}`` or ``{"prompt": [messages]}``, plus any other fields.

Conversational rows need a tokenizer with a chat template. Every loader checks every
row before training starts, so a bad row 90 000 lines in fails in seconds rather than
hours into a run.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
"""Label value the cross-entropy loss skips (PyTorch's and transformers' convention)."""

CHAT_ROLES = ("system", "user", "assistant", "tool")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
"""File names a directory of shards is read from (sorted by name); other files in it are ignored."""

_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A dataset row that cannot be used; the message is ``FILE:LINE: reason`` (``FILE:row N`` for Parquet)."""


Messages = tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Record:
    """One row as read: where it is (``FILE:LINE`` or ``FILE:row N``) and its fields."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class SFTRow:
    """A training example: prompt + completion text, or chat messages with the indices of those trained on."""

    where: str
    prompt: str | None = None
    completion: str | None = None
    messages: Messages | None = None
    trained: tuple[int, ...] = ()
    """Indices of the assistant messages in ``messages`` that the loss covers."""


@dataclass(frozen=True)
class PreferenceRow:
    """A preference pair as the reward model reads it: ``prompt + chosen`` against ``prompt + rejected``.

    For conversational rows ``prompt`` is the chat template's rendering of the prompt messages with
    the generation prompt, and ``chosen``/``rejected`` the assistant's content (see ``reward_text``).
    """

    where: str
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    chat: bool = False
    """Rendered by the chat template (which holds any BOS itself)."""


@dataclass(frozen=True)
class PromptRow:
    """A PPO prompt: text or messages, and the row's other fields (e.g. an answer for verifiable rewards)."""

    prompt: str | Messages
    fields: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)
    """``FILE:LINE`` of the row (not compared: two rows with the same prompt and fields are equal)."""


@dataclass(frozen=True)
class TokenizedExample:
    """``input_ids`` and ``labels`` of equal length; labels are IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


# --------------------------------------------------------------------------- reading


def data_files(path: str | Path) -> list[Path]:
    """The files a dataset path stands for: the file itself, or a directory's data files sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith((".", "_")) and p.name.lower().endswith(DATA_SUFFIXES))
        if not files:
            raise DatasetError(f"{path}: directory holds no data files (names ending in {', '.join(DATA_SUFFIXES)})")
        return files
    if not path.exists():
        raise DatasetError(f"{path}: file does not exist")
    return [path]


def read_records(path: str | Path) -> list[Record]:
    """Every row of the dataset at ``path`` (a file or a directory of shards), in order.

    The format comes from the content, not only the name: Parquet by its magic bytes, gzip
    by its magic bytes (then by the name without ``.gz``); ``.json`` holds a JSON array or
    JSON Lines; ``.csv`` a header line; anything else is JSON Lines. Blank lines are skipped.
    DatasetError names the file and line (row for Parquet and JSON arrays) of the first row
    that is not an object, and a dataset without rows.
    """
    records = []
    for file in data_files(path):
        records.extend(_read_file(file))
    if not records:
        raise DatasetError(f"{path}: no rows (the file is empty or only has blank lines)")
    return records


def _read_file(path: Path) -> list[Record]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror}") from None
    name = path.name.lower()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: not a readable gzip file: {exc}") from None
        name = name.removesuffix(".gz")
    if data[:4] == _PARQUET_MAGIC:
        return _read_parquet(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}); datasets are JSON Lines, JSON, CSV "
                           "or Parquet, optionally gzip-compressed") from None
    if name.endswith(".csv"):
        return _read_csv(path, text)
    if name.endswith(".json") and text.lstrip().startswith("["):
        return _read_json_array(path, text)
    return _read_json_lines(path, text)


def _read_json_lines(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(f"{path}:{number}", obj))
    return records


def _read_json_array(path: Path, text: str) -> list[Record]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    records = []
    for number, obj in enumerate(rows, start=1):
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:row {number}: expected a JSON object, got {type(obj).__name__}")
        records.append(Record(f"{path}:row {number}", obj))
    return records


def _read_csv(path: Path, text: str) -> list[Record]:
    """CSV with a header line; every value is a string (empty cells are left out of the row)."""
    reader = csv.DictReader(io.StringIO(text))
    records = []
    for row in reader:
        if None in row:
            raise DatasetError(f"{path}:{reader.line_num}: more cells than the header has columns")
        values = {k: v for k, v in row.items() if v not in (None, "")}
        if values:
            records.append(Record(f"{path}:{reader.line_num}", values))
    return records


def _read_parquet(path: Path, data: bytes) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from None
    # Parquet has no "missing key": an absent value is null, treated as a missing field.
    return [Record(f"{path}:row {number}", {k: v for k, v in row.items() if v is not None})
            for number, row in enumerate(table.to_pylist(), start=1)]


def _read_objects(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, object) of every row: ``read_records`` as pairs."""
    return [(r.where, r.fields) for r in read_records(path)]


# --------------------------------------------------------------------------- validation


def _string_field(obj: dict[str, Any], name: str, *, where: str) -> str:
    if name not in obj:
        raise DatasetError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: field {name!r} is empty")
    return value


def _messages(value: Any, *, name: str, where: str) -> Messages:
    """A validated message list: roles from CHAT_ROLES, string content (empty only beside tool_calls).

    Other keys (``tool_calls``, ``name``, ``tool_call_id`` ...) are kept for the chat template.
    """
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: field {name!r} must be a non-empty list of messages")
    checked = []
    for i, message in enumerate(value):
        here = f"{where}: {name}[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{here}: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise DatasetError(f"{here}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if message.get("tool_calls") and message.get("content") in (None, ""):
            checked.append({**message, "content": ""})
        else:
            checked.append({**message, "content": _string_field(message, "content", where=here)})
    return tuple(checked)


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def _need_template(has_template: bool, *, where: str) -> None:
    if not has_template:
        raise DatasetError(f"{where}: conversational rows (message lists) need a tokenizer with a chat "
                           "template; this model's tokenizer has none (use string fields)")


def _assistant_indices(messages: Messages, *, start: int = 0) -> tuple[int, ...]:
    return tuple(i for i in range(start, len(messages)) if messages[i]["role"] == "assistant")
def _report_count(path: str | Path, *, used: int, kind: str) -> None:
    print(f"{path}: using {used} {kind} rows", file=sys.stderr, flush=True)


ASSISTANT_TURNS = ("last", "all")


def load_sft_rows(path: str | Path, *, tokenizer, assistant_turns: str = "last") -> list[SFTRow]:
    """Validated SFT rows; conversational rows are accepted only when ``tokenizer`` has a chat template.

    ``assistant_turns`` (``{"messages"}`` rows): ``last`` trains the final assistant message only,
    ``all`` every assistant message after the first message (each earlier turn is context for the next).
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for record in read_records(path):
        obj, where = record.fields, record.where
        if "messages" in obj:
            _need_template(has_template, where=where)
            messages = _messages(obj["messages"], name="messages", where=where)
            if messages[-1]["role"] != "assistant":
                raise DatasetError(f"{where}: the last message must have role 'assistant' (it is what is trained on)")
            if len(messages) < 2:
                raise DatasetError(f"{where}: 'messages' needs at least one message before the assistant's")
            trained = _assistant_indices(messages, start=1) if assistant_turns == "all" else (len(messages) - 1,)
            rows.append(SFTRow(where=where, messages=messages, trained=trained))
        elif _is_conversational(obj.get("prompt")) or _is_conversational(obj.get("completion")):
            _need_template(has_template, where=where)
            prompt = _messages(obj.get("prompt"), name="prompt", where=where)
            completion = _messages(obj.get("completion"), name="completion", where=where)
            messages = prompt + completion
            trained = _assistant_indices(messages, start=len(prompt))
            if not trained:
                raise DatasetError(f"{where}: 'completion' has no message with role 'assistant' (it is what is "
                                   "trained on)")
            rows.append(SFTRow(where=where, messages=messages, trained=trained))
        else:
            rows.append(SFTRow(where=where, prompt=_string_field(obj, "prompt", where=where),
                               completion=_string_field(obj, "completion", where=where)))
    _report_count(path, used=len(rows), kind="SFT")
    return rows


def _margin(obj: dict[str, Any], *, where: str) -> float:
    margin = obj.get("margin", 0.0)
    if isinstance(margin, str):  # CSV cells are strings
        try:
            return float(margin)
        except ValueError:
            pass
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DatasetError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
    return float(margin)


def _common_prefix(chosen: Messages, rejected: Messages) -> int:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _chat_response(tokenizer, prompt: Messages, response: Messages, *, where: str) -> str:
    """The text after the rendered prompt: a lone assistant message's content (what PPO decodes
    from a sampled response), else the template's rendering of the messages after the prompt."""
    if len(response) == 1 and response[0]["role"] == "assistant" and response[0]["content"]:
        return response[0]["content"]
    head = render_chat(tokenizer, prompt, generation_prompt=True)
    full = render_chat(tokenizer, prompt + response, generation_prompt=False)
    if not full.startswith(head):
        raise DatasetError(f"{where}: the chat template does not render the conversation as prompt + reply")
    return full[len(head):]


def load_preference_rows(path: str | Path, *, tokenizer=None) -> list[PreferenceRow]:
    """Validated preference pairs, in the text the reward model scores (see ``PreferenceRow``).

    ``prompt``, ``chosen`` and ``rejected`` are all strings or all message lists (those need
    ``tokenizer`` with a chat template). Without ``prompt`` (implicit prompt) strings are scored
    whole and message lists split at their last common message. ``margin`` (optional) is a number.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for record in read_records(path):
        obj, where = record.fields, record.where
        margin = _margin(obj, where=where)
        names = ("prompt", "chosen", "rejected") if "prompt" in obj else ("chosen", "rejected")
        kinds = {name: _is_conversational(obj.get(name)) for name in names}
        if any(kinds.values()):
            if not all(kinds.values()):
                raise DatasetError(f"{where}: fields {', '.join(names)} must be all strings or all message lists")
            _need_template(has_template, where=where)
            chosen = _messages(obj["chosen"], name="chosen", where=where)
            rejected = _messages(obj["rejected"], name="rejected", where=where)
            if "prompt" in obj:
                prompt = _messages(obj["prompt"], name="prompt", where=where)
            else:
                shared = _common_prefix(chosen, rejected)
                if shared == 0 or shared == min(len(chosen), len(rejected)):
                    raise DatasetError(f"{where}: without 'prompt', 'chosen' and 'rejected' must start with the same "
                                       "prompt messages and then differ")
                prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            rows.append(PreferenceRow(
                where=where, prompt=render_chat(tokenizer, prompt, generation_prompt=True),
                chosen=_chat_response(tokenizer, prompt, chosen, where=where),
                rejected=_chat_response(tokenizer, prompt, rejected, where=where), margin=margin, chat=True))
        else:
            prompt = _string_field(obj, "prompt", where=where) if "prompt" in obj else ""
            rows.append(PreferenceRow(where=where, prompt=prompt, chosen=_string_field(obj, "chosen", where=where),
                                      rejected=_string_field(obj, "rejected", where=where), margin=margin))
    _report_count(path, used=len(rows), kind="preference")
    return rows


def load_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Validated PPO prompts in file order: text, or a message list (the conversation so far)."""
    rows = []
    for record in read_records(path):
        obj, where = record.fields, record.where
        if _is_conversational(obj.get("prompt")):
            messages = _messages(obj["prompt"], name="prompt", where=where)
            prompt: str | Messages = messages
        else:
            prompt = _string_field(obj, "prompt", where=where)
        rows.append(PromptRow(where=where, prompt=prompt, fields={k: v for k, v in obj.items() if k != "prompt"}))
    _report_count(path, used=len(rows), kind="prompt")
    return rows


# --------------------------------------------------------------------------- rendering and tokenisation


def render_chat(tokenizer, messages, *, generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (with the assistant's opening when ``generation_prompt``)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def render_prompt(tokenizer, prompt: str | Messages, *, chat_template: bool) -> str:
    """The text a policy is given for a prompt row: messages through the chat template; a string
    as one user message through it when ``chat_template`` and the tokenizer has one, else as is."""
    if isinstance(prompt, str):
        if chat_template and getattr(tokenizer, "chat_template", None):
            return render_chat(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError("conversational prompts (message lists) need a tokenizer with a chat template")
    return render_chat(tokenizer, prompt, generation_prompt=True)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's special tokens (BOS), but never two BOS in a row:
    a chat template's text already starts with the BOS that the tokenizer adds again."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def _chat_pieces(row: SFTRow, *, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces at the trained assistant messages.

    Each trained message i spans from the end of ``messages[:i]`` rendered with the generation
    prompt to the end of ``messages[:i+1]``; a template that rewrites earlier turns (so these are
    not prefixes of the whole) cannot be masked and is refused.
    """
    messages = list(row.messages)
    full = render_chat(tokenizer, messages, generation_prompt=False)
    pieces, position = [], 0
    for i in row.trained:
        before = render_chat(tokenizer, messages[:i], generation_prompt=True)
        through = render_chat(tokenizer, messages[:i + 1], generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= position):
            raise DatasetError(f"{row.where}: the chat template does not render the conversation as prompt + "
                               f"assistant reply at message {i}; cannot mask the prompt")
        pieces += [(full[position:len(before)], False), (full[len(before):len(through)], True)]
        position = len(through)
    if position < len(full):
        pieces.append((full[position:], False))
    return pieces


def _sft_pieces(row: SFTRow, *, tokenizer) -> list[tuple[str, bool, bool]]:
    """(text, trained, with special tokens) pieces of one row, in order; empty texts left out."""
    if row.messages is not None:
        # The chat template already contains any BOS it wants.
        return [(text, trained, False) for text, trained in _chat_pieces(row, tokenizer=tokenizer) if text]
    return [(row.prompt, False, True), (row.completion, True, False)]


def tokenize_sft_rows(rows: list[SFTRow], *, tokenizer, max_length: int) -> list[TokenizedExample]:
    """``tokenize_sft_row`` for many rows, with one batched tokenizer call per kind of piece (fast tokenizers
    encode a batch in parallel, in Rust), which is what a stage uses."""
    pieces = [_sft_pieces(row, tokenizer=tokenizer) for row in rows]
    ids: dict[tuple[int, int], list[int]] = {}
    for special in (True, False):
        where = [(r, k) for r, row_pieces in enumerate(pieces) for k, piece in enumerate(row_pieces)
                 if piece[2] == special]
        if where:
            texts = [pieces[r][k][0] for r, k in where]
            ids.update(zip(where, tokenizer(texts, add_special_tokens=special)["input_ids"]))
    return [_assemble_sft(row, [(ids[(r, k)], trained) for k, (_, trained, _) in enumerate(pieces[r])],
                          tokenizer=tokenizer, max_length=max_length) for r, row in enumerate(rows)]


def tokenize_sft_row(row: SFTRow, *, tokenizer, max_length: int) -> TokenizedExample:
    """Token ids with labels IGNORE_INDEX outside the trained text (the prompt, untrained turns).

    Prompt/completion rows are ``prompt`` (with the tokenizer's BOS) followed directly by
    ``completion``, no separator added. The last trained text ends with EOS (appended
    unless it already holds one, as a chat template's end-of-turn usually is) so the
    model learns to stop. Over-long examples keep at least half of ``max_length`` for the
    last trained text and cut from the left first (the end of the context matters most),
    then cut the trained text from the right.
    """
    return tokenize_sft_rows([row], tokenizer=tokenizer, max_length=max_length)[0]


def _assemble_sft(row: SFTRow, encoded: list[tuple[list[int], bool]], *, tokenizer,
                  max_length: int) -> TokenizedExample:
    """One row's example from its pieces' (ids, trained), as ``tokenize_sft_row`` describes."""
    trained_pieces = [i for i, (ids, trained) in enumerate(encoded) if trained and ids]
    if not trained_pieces:
        raise DatasetError(f"{row.where}: no tokens to train on")
    last = trained_pieces[-1]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in encoded[last][0]:
        encoded[last] = (encoded[last][0] + [eos], True)
    context_ids, context_labels = [], []
    for ids, trained in encoded[:last]:
        context_ids += ids
        context_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    completion = encoded[last][0]
    tail = [t for ids, _ in encoded[last + 1:] for t in ids]  # untrained text after the last trained turn
    keep_context, keep_completion = _truncate(len(context_ids), len(completion) + len(tail), max_length=max_length)
    completion_ids = (completion + tail)[:keep_completion]
    completion_labels = (completion + [IGNORE_INDEX] * len(tail))[:keep_completion]
    start = len(context_ids) - keep_context
    return TokenizedExample(input_ids=context_ids[start:] + completion_ids,
                            labels=context_labels[start:] + completion_labels)


def _truncate(prompt: int, completion: int, *, max_length: int) -> tuple[int, int]:
    """(prompt tokens kept from the end, completion tokens kept from the start) within ``max_length``."""
    if prompt + completion <= max_length:
        return prompt, completion
    completion_budget = max(max_length - prompt, min(completion, max_length // 2))
    completion = min(completion, completion_budget)
    return max_length - completion, completion


def encode_for_reward(tokenizer, *, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids the reward model scores for (prompt, response); PPO must score the same way.

    ``prompt + response`` as one text (``encode_text``: BOS once). No EOS is appended: the score is
    read at the last non-pad token, and when pad == eos an appended EOS would be mistaken for
    padding. Over-long inputs lose the start of the prompt, never the end of the response being judged.
    """
    return encode_text(tokenizer, prompt + response)[-max_length:]


def pad_right(sequences: list[list[int]], *, pad_value: int) -> list[list[int]]:
    """Right-pad to the longest sequence (training batches are right-padded)."""
    width = max(len(s) for s in sequences)
    return [s + [pad_value] * (width - len(s)) for s in sequences]


def split_for_eval(rows: list, *, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) split, seeded so every process and every restart agrees.

    With fraction > 0 at least one row is held out (when there are two or more).
    """
    import random

    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held_out = set(order[:held])
    return ([r for i, r in enumerate(rows) if i not in held_out],
            [r for i, r in enumerate(rows) if i in held_out])


# --------------------------------------------------------------------------- tokenised once per stage

TOKENIZED_DIR = "tokenized"
"""Under the stage's outputDir: one JSON file per (data, tokenizer, settings), reused by retries and resumes."""


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides the token ids: the fast tokenizer's whole state (vocabulary, merges,
    normalisers, post-processor), its special tokens and its chat template."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {"backend": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
             "chat_template": getattr(tokenizer, "chat_template", None), "class": type(tokenizer).__name__}
    return "sha256:" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def tokenized_once(kind: str, path: str | Path, *, tokenizer, settings: dict[str, Any], cache_dir: Path,
                   accelerator, build, describe, log=None) -> Any:
    """``build()`` (read, check and tokenise the dataset at ``path``) once per stage, on the main process only.

    The JSON result is cached in ``cache_dir`` (``<outputDir>/tokenized``) under a key made of
    ``kind``, the data's digest (every shard), the tokenizer's digest and the ``settings`` that
    change the ids, so a retry, a resume or another rank reads the file instead of tokenising again,
    and changed data, tokenizer or settings tokenise anew. ``accelerator``: anything with
    ``is_main_process`` and ``wait_for_everyone()``. Bad rows fail on the main process with
    ``FILE:LINE`` as before. ``describe(value)`` says what was tokenised, for the log line.
    """
    import hashlib

    from trainer.provenance import dataset_digest

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    # "format" 2: {"key", "value"} files (the SFT-only cache of before wrote {"key", "examples"}).
    key = {"kind": kind, "format": 2, "data": dataset_digest(path), "tokenizer": tokenizer_digest(tokenizer),
           **settings}
    cache = Path(cache_dir) / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    value, built = None, False
    if accelerator.is_main_process and not cache.exists():
        value, built = build(), True
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        partial.write_text(json.dumps({"key": key, "value": value}))
        partial.replace(cache)  # atomic: a reader never sees half a file
        log(f"{path}: tokenised {describe(value)} once, cached in {cache}")
    accelerator.wait_for_everyone()
    if not built:
        value = json.loads(cache.read_text())["value"]
        if accelerator.is_main_process:
            log(f"{path}: {describe(value)} tokenised earlier, reused from {cache}")
    return value


def sft_examples(path: str | Path, *, tokenizer, max_length: int, assistant_turns: str, cache_dir: Path,
                 accelerator, log=None) -> list[TokenizedExample]:
    """The SFT dataset read, checked and tokenised once per stage (``tokenized_once``)."""
    def build() -> list[list[list[int]]]:
        rows = load_sft_rows(path, tokenizer=tokenizer, assistant_turns=assistant_turns)
        return [[e.input_ids, e.labels] for e in tokenize_sft_rows(rows, tokenizer=tokenizer, max_length=max_length)]

    stored = tokenized_once("sft", path, tokenizer=tokenizer, cache_dir=cache_dir, accelerator=accelerator, log=log,
                            settings={"max_length": max_length, "assistant_turns": assistant_turns}, build=build,
                            describe=lambda value: f"{len(value)} examples")
    return [TokenizedExample(input_ids=ids, labels=labels) for ids, labels in stored]
