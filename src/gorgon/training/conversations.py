"""Conversation datasets in one normal form: ShareGPT or OpenAI messages, JSON or JSONL, read into lists of
`{"role", "content"}` messages, each named by a stable key.

Accepted records (one per JSON list item or JSONL line):
- ShareGPT: `{"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": "..."}]}`
- OpenAI: `{"messages": [{"role": "user" | "assistant" | "system", "content": "..."}]}`
- a bare list of messages in either form (so Gorgon's own distill output reads back in).

Self-distillation replays only the system and user turns (the model writes every answer), so the key hashes
those alone: two records that differ only in their assistant turns are one job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")
# ShareGPT `from` values seen in the wild, mapped to OpenAI roles.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
_KEY_VERSION = "v1"


class InvalidRecord(ValueError):
    """A record that is not a conversation we can replay; the message says why."""


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation and where it stood in the input."""

    messages: tuple[Message, ...]
    index: int = 0

    @property
    def prompts(self) -> tuple[Message, ...]:
        """What replay sends: every message but the assistant's, in order."""
        return tuple(m for m in self.messages if m["role"] != "assistant")

    @property
    def num_user_turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    @property
    def key(self) -> str:
        return conversation_key(self.messages)


@dataclass
class LoadedDataset:
    conversations: list[Conversation]
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason)
    duplicates: int = 0  # records whose key an earlier record already had


def conversation_key(messages: tuple[Message, ...] | list[Message]) -> str:
    """A stable hash of the replayed part of a conversation (system and user turns, in order)."""
    replayed = [[m["role"], m["content"]] for m in messages if m["role"] != "assistant"]
    blob = json.dumps([_KEY_VERSION, replayed], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        ]
        if len(parts) != len(content):
            raise InvalidRecord("message has non-text content parts (images, audio): not supported")
        return "".join(parts)
    raise InvalidRecord(
        f"message content must be a string or a list of text parts, not {type(content).__name__}"
    )


def _message(raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise InvalidRecord(f"a message must be an object, not {type(raw).__name__}")
    if "role" in raw:
        role = str(raw["role"]).lower()
        if role not in ROLES:
            raise InvalidRecord(f"unsupported role {raw['role']!r} (expected one of {', '.join(ROLES)})")
        return {"role": role, "content": _content_text(raw.get("content"))}
    if "from" in raw:
        role = _SHAREGPT_ROLES.get(str(raw["from"]).lower())
        if role is None:
            raise InvalidRecord(f"unsupported ShareGPT speaker {raw['from']!r}")
        return {"role": role, "content": _content_text(raw.get("value"))}
    raise InvalidRecord("a message needs `role`/`content` (OpenAI) or `from`/`value` (ShareGPT)")


def normalise(record: Any) -> tuple[Message, ...]:
    """The messages of one record, with OpenAI roles. Raises InvalidRecord saying what is wrong with it."""
    if isinstance(record, dict):
        if "conversations" in record:
            raw = record["conversations"]
        elif "messages" in record:
            raw = record["messages"]
        else:
            raise InvalidRecord("record has neither `conversations` (ShareGPT) nor `messages` (OpenAI)")
    elif isinstance(record, list):
        raw = record
    else:
        raise InvalidRecord(f"a record must be an object or a list of messages, not {type(record).__name__}")
    if not isinstance(raw, list):
        raise InvalidRecord("the conversation must be a list of messages")
    messages = tuple(_message(m) for m in raw)
    if not any(m["role"] == "user" for m in messages):
        raise InvalidRecord("conversation has no user turn")
    if any(m["role"] == "user" and not m["content"].strip() for m in messages):
        raise InvalidRecord("conversation has an empty user turn")
    return messages


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and ("role" in item or "from" in item) and "messages" not in item


def read_records(path: str | Path) -> list[Any]:
    """The raw records of a JSON file (a list of records, one record, or one bare conversation) or JSONL file.

    Lines of a JSONL file that are not JSON are kept as `InvalidRecord` items, so they are reported per line
    rather than failing the whole file.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        records: list[Any] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(InvalidRecord(f"line {lineno} is not JSON: {e.msg}"))
        if records and all(isinstance(r, InvalidRecord) for r in records):
            raise ValueError(f"{path} is neither a JSON document nor JSON lines") from None
        return records
    if isinstance(data, dict):
        if "conversations" in data or "messages" in data:
            return [data]
        raise ValueError(f"{path}: expected a list of conversations, got an object without `messages`")
    if isinstance(data, list) and data and all(_is_message(item) for item in data):
        return [data]  # one bare conversation
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a list of conversations, got {type(data).__name__}")


def load_conversations(path: str | Path) -> LoadedDataset:
    """Read and normalise every record; bad records and repeated keys are counted, not fatal."""
    out = LoadedDataset(conversations=[])
    seen: set[str] = set()
    for i, record in enumerate(read_records(path)):
        try:
            if isinstance(record, InvalidRecord):
                raise record
            messages = normalise(record)
        except InvalidRecord as e:
            out.invalid.append((i, str(e)))
            continue
        conv = Conversation(messages, index=i)
        if conv.key in seen:
            out.duplicates += 1
            continue
        seen.add(conv.key)
        out.conversations.append(conv)
    for i, reason in out.invalid[:5]:
        log.warning("record %d skipped: %s", i, reason)
    if len(out.invalid) > 5:
        log.warning("... and %d more invalid records", len(out.invalid) - 5)
    return out
