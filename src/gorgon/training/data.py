"""Conversations -> token ids and an assistant mask, by the model's own chat template.

The text is rendered once with the chat template and tokenised as the server tokenises a chat prompt (the
template writes BOS itself, so no special tokens are added). An assistant turn spans from where the template
would put the generation prompt (`messages[:i]` rendered with `add_generation_prompt=True`) to the end of its
own rendering (`messages[:i+1]`), trailing whitespace excluded: its content and its end-of-turn token, which
the model must also predict. Templates that do not render a conversation incrementally (some rewrite earlier
turns) cannot be split this way; such conversations are skipped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gorgon.training.conversations import InvalidRecord, Message, normalise, read_records

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: tuple[int, ...]
    assistant_mask: tuple[bool, ...]  # True where the token belongs to an assistant turn

    @property
    def labels(self) -> list[int]:
        """The token where the mask is set, IGNORE_INDEX elsewhere."""
        return [t if m else IGNORE_INDEX for t, m in zip(self.input_ids, self.assistant_mask)]

    @property
    def num_assistant_tokens(self) -> int:
        return sum(self.assistant_mask)


@dataclass
class TokenizedDataset:
    items: list[TokenizedConversation]
    skipped: Counter = field(default_factory=Counter)  # reason -> conversations
    truncated: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(c.input_ids) for c in self.items)

    @property
    def num_assistant_tokens(self) -> int:
        return sum(c.num_assistant_tokens for c in self.items)


def load_message_lists_from(paths: str) -> list[tuple[Message, ...]]:
    """`load_message_lists` of each comma-separated file, concatenated in order."""
    return [conv for path in paths.split(",") if path.strip() for conv in load_message_lists(path.strip())]


def load_message_lists(path: str | Path) -> list[tuple[Message, ...]]:
    """Every conversation of a JSON/JSONL file (message lists as `gorgon distill` writes, OpenAI `messages`
    or ShareGPT), normalised to OpenAI roles. Unlike replay, nothing is deduplicated: two conversations with
    the same prompts and different answers are both training data."""
    if not Path(path).is_file():
        raise ValueError(f"Conversation file {path} does not exist.")
    out, invalid = [], Counter()
    for record in read_records(path):
        try:
            if isinstance(record, InvalidRecord):
                raise record
            out.append(normalise(record))
        except InvalidRecord as e:
            invalid[str(e)] += 1
    for reason, n in invalid.most_common(5):
        log.warning("%d record(s) of %s skipped: %s", n, path, reason)
    if not out:
        raise ValueError(f"{path} holds no usable conversation (expected message lists or ShareGPT records).")
    return out


def assistant_spans(tokenizer: Any, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span [start, end) of each assistant turn in it.

    Raises ValueError when the template cannot render the conversation or does not render it incrementally.
    """
    msgs = list(messages)

    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], add_generation_prompt=prompt, tokenize=False)

    try:
        text = render(len(msgs), False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = render(i, True) if i else ""
            through = render(i + 1, False)
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError("the chat template does not render this conversation incrementally")
            spans.append((len(before), len(through.rstrip())))
    except ValueError:
        raise
    except Exception as e:  # jinja's TemplateError, or a template's own raise_exception()
        raise ValueError(f"the chat template cannot render this conversation ({e})") from e
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[Message], max_length: int
) -> tuple[TokenizedConversation, bool]:
    """Token ids and assistant mask of one conversation, cut to `max_length` tokens; and whether it was cut."""
    text, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # A token is the assistant's when it starts inside a span (a token straddling the start is not).
        mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    else:  # no offsets: tokenise the pieces between span boundaries on their own
        ids, mask, cursor = [], [], 0
        for s, e in spans:
            for a, b, is_assistant in ((cursor, s, False), (s, e, True)):
                piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"] if b > a else []
                ids += piece
                mask += [is_assistant] * len(piece)
            cursor = e
        tail = tokenizer(text[cursor:], add_special_tokens=False)["input_ids"] if cursor < len(text) else []
        ids += tail
        mask += [False] * len(tail)
    cut = len(ids) > max_length
    return TokenizedConversation(tuple(ids[:max_length]), tuple(mask[:max_length])), cut


def tokenize_conversations(
    tokenizer: Any, conversations: Sequence[Sequence[Message]], max_length: int, min_labels: int = 3
) -> TokenizedDataset:
    """Tokenise every conversation; skip (and count, by reason) those the template cannot split and those
    left with fewer than `min_labels` assistant tokens (head 0 needs a label two places after a position)."""
    out = TokenizedDataset(items=[])
    for messages in conversations:
        if not any(m["role"] == "assistant" for m in messages):
            out.skipped["no assistant turn"] += 1
            continue
        try:
            item, cut = tokenize_conversation(tokenizer, messages, max_length)
        except ValueError as e:
            out.skipped[str(e)] += 1
            continue
        if item.num_assistant_tokens < min_labels:
            out.skipped["too few assistant tokens (after truncation)"] += 1
            continue
        out.items.append(item)
        out.truncated += cut
    for reason, n in out.skipped.most_common():
        log.warning("%d conversation(s) skipped: %s", n, reason)
    if out.truncated:
        log.info("%d conversation(s) cut to %d tokens", out.truncated, max_length)
    if not out.items:
        raise ValueError(
            "No conversation has assistant tokens to train on"
            + (f" ({', '.join(f'{r}: {n}' for r, n in out.skipped.items())})" if out.skipped else "")
            + ": check --data_path and the model's chat template."
        )
    return out
