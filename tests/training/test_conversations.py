"""Reading ShareGPT and OpenAI conversation files (JSON, JSONL, bare lists) into one normal form."""

from __future__ import annotations

import json

import pytest

from gorgon.training.conversations import (
    Conversation,
    InvalidRecord,
    conversation_key,
    load_conversations,
    normalise,
)

SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
]


def test_sharegpt_json_maps_roles_and_keeps_system(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    data = load_conversations(path)
    assert [c.index for c in data.conversations] == [0, 1]
    first = data.conversations[0]
    assert first.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    )
    assert first.num_user_turns == 2
    assert [m["role"] for m in first.prompts] == ["system", "user", "user"]
    assert data.invalid == [] and data.duplicates == 0


def test_openai_jsonl_with_messages_and_bare_lists(tmp_path):
    lines = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}]},
        [{"role": "user", "content": "two"}, {"role": "assistant", "content": "old answer"}],
        [{"from": "human", "value": "three"}],  # a bare ShareGPT list
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_conversations(path)
    assert [c.prompts[-1]["content"] for c in data.conversations] == ["one", "two", "three"]
    assert data.conversations[0].messages[0] == {"role": "system", "content": "S"}


def test_single_bare_conversation_and_our_own_output_read_back(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{"role": "user", "content": "solo"}]))
    assert [c.messages for c in load_conversations(bare).conversations] == [
        ({"role": "user", "content": "solo"},)
    ]
    ours = tmp_path / "ours.json"  # what `gorgon distill` writes: a list of message lists
    ours.write_text(
        json.dumps([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 1)
    )
    assert len(load_conversations(ours).conversations) == 1


def test_invalid_records_and_duplicates_are_counted_not_fatal(tmp_path):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "ok"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}),
        json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}]}),
        "{not json",
        json.dumps({"text": "neither format"}),
        # the same user turns with another answer: the same job
        json.dumps({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "z"}]}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    data = load_conversations(path)
    assert len(data.conversations) == 1
    assert [i for i, _ in data.invalid] == [1, 2, 3, 4]
    assert "not JSON" in data.invalid[2][1]
    assert data.duplicates == 1


def test_content_parts_and_errors():
    msgs = normalise(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}]}
    )
    assert msgs == ({"role": "user", "content": "ab"},)
    with pytest.raises(InvalidRecord, match="non-text"):
        normalise({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(InvalidRecord, match="empty user turn"):
        normalise([{"role": "user", "content": "  "}])
    with pytest.raises(InvalidRecord, match="speaker"):
        normalise({"conversations": [{"from": "observation", "value": "x"}]})


def test_key_is_stable_and_ignores_assistant_turns():
    share = normalise({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A"}]})
    openai = normalise([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "B"}])
    assert conversation_key(share) == conversation_key(openai)
    assert conversation_key(share) == conversation_key([{"role": "user", "content": "Hi"}])
    assert len(Conversation(share).key) == 32
    with_system = normalise([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert conversation_key(with_system) != conversation_key(share)


def test_key_value_is_pinned():
    # Keys must not change between runs or versions, or resuming would redo everything.
    assert conversation_key([{"role": "user", "content": "Hi"}]) == "158ad8d328f51f05fad37acf44e7fd22"


def test_file_level_errors(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="expected a list"):
        load_conversations(path)
