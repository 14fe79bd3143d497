"""JSON Lines datasets: validation with file:line errors, and tokenisation.

Formats (one JSON object per line, blank lines skipped):

- SFT: ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
  (chat rows need a tokenizer with a chat template; the last message must be the
  assistant's, and only that message is trained on).
- Preferences: ``{"prompt": str, "chosen": str, "rejected": str}`` plus an optional
  numeric ``"margin"``.
- Prompts (PPO): ``{"prompt": str}``.

Every loader checks every row before training starts, so a bad row 90 000 lines
in fails in seconds rather than hours into a run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
"""Label value the cross-entropy loss skips (PyTorch's and transformers' convention)."""

CHAT_ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A dataset row that cannot be used; the message is ``FILE:LINE: reason``."""


@dataclass(frozen=True)
class SFTRow:
    """A training example: either prompt + completion, or chat messages (last one is the assistant's)."""

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True)
class PreferenceRow:
    line: int
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass(frozen=True)
class TokenizedExample:
    """``input_ids`` and ``labels`` of equal length; labels are IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def _read_objects(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; DatasetError on anything that is not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    if not rows:
        raise DatasetError(f"{path}: no rows (the file is empty or only has blank lines)")
    return rows


def _string_field(obj: dict[str, Any], name: str, *, where: str) -> str:
    if name not in obj:
        raise DatasetError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DatasetError(f"{where}: field {name!r} is empty")
    return value


def _messages_field(obj: dict[str, Any], *, where: str) -> tuple[dict[str, str], ...]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: field 'messages' must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        here = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{here}: expected an object with 'role' and 'content'")
        role = _string_field(message, "role", where=here)
        if role not in CHAT_ROLES:
            raise DatasetError(f"{here}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        checked.append({"role": role, "content": _string_field(message, "content", where=here)})
    if checked[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: the last message must have role 'assistant' (it is what is trained on)")
    if len(checked) < 2:
        raise DatasetError(f"{where}: 'messages' needs at least one message before the assistant's")
    return tuple(checked)


def _report_count(path: str | Path, *, used: int, kind: str) -> None:
    print(f"{path}: using {used} {kind} rows", file=sys.stderr, flush=True)


def load_sft_rows(path: str | Path, *, tokenizer) -> list[SFTRow]:
    """Validated SFT rows; chat rows are accepted only when ``tokenizer`` has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for number, obj in _read_objects(path):
        where = f"{path}:{number}"
        if "messages" in obj:
            if not has_template:
                raise DatasetError(f"{where}: chat 'messages' rows need a tokenizer with a chat template; "
                                   "this model's tokenizer has none (use prompt/completion rows)")
            rows.append(SFTRow(line=number, messages=_messages_field(obj, where=where)))
        else:
            rows.append(SFTRow(line=number, prompt=_string_field(obj, "prompt", where=where),
                               completion=_string_field(obj, "completion", where=where)))
    _report_count(path, used=len(rows), kind="SFT")
    return rows


def load_preference_rows(path: str | Path) -> list[PreferenceRow]:
    """Validated preference pairs; ``margin`` (optional) must be a number."""
    rows = []
    for number, obj in _read_objects(path):
        where = f"{path}:{number}"
        margin = obj.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DatasetError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
        rows.append(PreferenceRow(
            line=number,
            prompt=_string_field(obj, "prompt", where=where),
            chosen=_string_field(obj, "chosen", where=where),
            rejected=_string_field(obj, "rejected", where=where),
            margin=float(margin),
        ))
    _report_count(path, used=len(rows), kind="preference")
    return rows


def load_prompt_rows(path: str | Path) -> list[str]:
    """Validated PPO prompts, in file order."""
    prompts = [_string_field(obj, "prompt", where=f"{path}:{number}") for number, obj in _read_objects(path)]
    _report_count(path, used=len(prompts), kind="prompt")
    return prompts


def _split_chat(row: SFTRow, *, tokenizer) -> tuple[str, str]:
    """(prompt text, completion text) of a chat row, rendered with the tokenizer's chat template."""
    messages = list(row.messages)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        # Templates that rewrite earlier turns cannot be split at a token boundary we trust.
        raise DatasetError(f"line {row.line}: the chat template does not render the conversation "
                           "as prompt + assistant reply; cannot mask the prompt")
    return prompt, full[len(prompt):]


def tokenize_sft_row(row: SFTRow, *, tokenizer, max_length: int) -> TokenizedExample:
    """Token ids with labels IGNORE_INDEX on the prompt, so the loss covers the completion only.

    The completion ends with EOS (added unless the template already put it
    there) so the model learns to stop. Over-long examples keep at least half
    of ``max_length`` for the completion and cut the prompt from the left (its
    end matters most), then cut the completion from the right.
    """
    if row.messages is not None:
        prompt_text, completion_text = _split_chat(row, tokenizer=tokenizer)
        # The chat template already contains any BOS it wants.
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_text, completion_text = row.prompt, row.completion
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = completion_ids + [eos]
    prompt_ids, completion_ids = _truncate(prompt_ids, completion_ids, max_length=max_length)
    return TokenizedExample(
        input_ids=prompt_ids + completion_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    )


def _truncate(prompt: list[int], completion: list[int], *, max_length: int) -> tuple[list[int], list[int]]:
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    completion_budget = max(max_length - len(prompt), min(len(completion), max_length // 2))
    completion = completion[:completion_budget]
    prompt_budget = max_length - len(completion)
    return prompt[len(prompt) - prompt_budget:] if prompt_budget else [], completion


def encode_for_reward(tokenizer, *, prompt: str, response: str, max_length: int) -> list[int]:
    """Token ids the reward model scores for (prompt, response); PPO must score the same way.

    No EOS is appended: the score is read at the last non-pad token, and when
    pad == eos an appended EOS would be mistaken for padding. Over-long inputs
    lose the start of the prompt, never the end of the response being judged.
    """
    ids = tokenizer(prompt + response, add_special_tokens=True)["input_ids"]
    return ids[-max_length:]


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
