"""OpenAI-format chat JSONL -> token ids and labels for training on assistant turns only.

Labels cover each assistant turn's content *and its end-of-turn token* (so the expert learns
to stop), and nothing else: the prompt, the template's role headers and padding are -100.
Padding is masked by position, never by token id, so the pad token may equal EOS without
hiding the end token from the loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from validation.unicode import find_unencodable

IGNORE = -100
ROLES = {"system", "developer", "user", "assistant"}


class DataError(ValueError):
    """A problem in the training file; the message names the line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _messages(line: str, number: int) -> list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"line {number}: not valid JSON ({exc.msg})") from None
    except ValueError:  # json's own limit: an integer of over 4,300 digits
        raise DataError(f"line {number}: holds a number too long to read") from None
    except RecursionError:
        raise DataError(f"line {number}: nested too deeply") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f'line {number}: expected an object with a non-empty "messages" list')
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"line {number}: every message needs a role ({', '.join(sorted(ROLES))}) and string content")
        if find_unencodable(message["content"]) is not None:
            raise DataError(f"line {number}: a message's content is not valid Unicode text (a lone surrogate such "
                            "as \\ud800)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"line {number}: no assistant turn to learn from")
    if messages[0]["role"] == "assistant":
        raise DataError(f"line {number}: the conversation starts with the assistant; an assistant turn answers "
                        "a system or user message")
    return [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False))


def encode_conversation(tokenizer, messages: list[dict], end_of_turn_ids: set[int]) -> Example:
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        # keep up to and including the turn's end token; the template's trailing newline is not learned
        ends = [j for j in range(start, end) if ids[j] in end_of_turn_ids]
        stop = ends[0] + 1 if ends else end
        labels[start:stop] = ids[start:stop]
    return Example(ids, labels)


def scan_chat_lines(lines, tokenizer, end_of_turn_ids: set[int], max_length: int,
                    max_problems: int = 5) -> tuple[list[Example], list[str]]:
    """Every conversation of a chat JSONL file, and its problems (the first `max_problems`, each naming
    its line, then how many more): invalid JSON, no assistant turn, an unknown role, over `max_length`."""
    examples, problems, more = [], [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            messages = _messages(line, number)
            try:
                example = encode_conversation(tokenizer, messages, end_of_turn_ids)
            except Exception as exc:  # the chat template's own refusals (jinja raise_exception, a role order)
                raise DataError(f"line {number}: the base's chat template cannot render this conversation "
                                f"({type(exc).__name__})") from None
            if len(example.input_ids) > max_length:
                raise DataError(f"line {number}: {len(example.input_ids)} tokens, over the limit of {max_length} "
                                "(the context window)")
            if not any(label != IGNORE for label in example.labels):
                raise DataError(f"line {number}: the assistant turn is empty after the chat template")
        except DataError as exc:
            if len(problems) < max_problems:
                problems.append(str(exc))
            else:
                more += 1
            continue
        examples.append(example)
    if more:
        problems.append(f"and {more} more lines with problems")
    if not examples and not problems:
        problems.append("no conversations: the file is empty")
    return examples, problems


def first_user_prompts(lines, count: int, max_chars: int = 2000) -> list[str]:
    """Up to `count` distinct first user messages, taken at even spacing through the file's conversations:
    a fine-tuned expert's routing examples when its job gave none (its training prompts are what it is
    for). Lines that are not a valid conversation are skipped; long prompts are cut at `max_chars`."""
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            messages = _messages(line, number)
        except DataError:
            continue
        first = next((m["content"] for m in messages if m["role"] == "user" and m["content"].strip()), None)
        if first is not None:
            prompts.append(first.strip()[:max_chars])
    if len(prompts) > count:
        prompts = [prompts[i * len(prompts) // count] for i in range(count)]
    return list(dict.fromkeys(prompts))


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL file: split at newlines only. str.splitlines() also splits at \\x0c, \\x1c-\\x1e,
    \\x85, U+2028 and U+2029, which may stand raw inside a JSON string: a line holding one would be cut in two,
    and a check that splits one way while training splits another would pass a file that then fails."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def load_chat_jsonl(path: str | Path, tokenizer, end_of_turn_ids: set[int], max_length: int) -> list[Example]:
    """All conversations of the file; DataError naming every problem's line (the first few) if any. The
    message names the file by its name only: it may reach a client, who has no business with our paths."""
    text = Path(path).read_text(encoding="utf-8")
    examples, problems = scan_chat_lines(jsonl_lines(text), tokenizer, end_of_turn_ids, max_length)
    if problems:
        raise DataError(f"{Path(path).name}: " + "; ".join(problems))
    return examples
