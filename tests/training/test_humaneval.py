"""HumanEval prompts as chat requests for code self-distillation."""

from gorgon.bench.prompts import CODE_PROMPTS
from gorgon.training.humaneval import as_conversations, humaneval_prompts


def test_humaneval_prompts_as_conversations():
    prompts = humaneval_prompts()
    assert len(prompts) == 164 and all("def " in p for p in prompts)
    conversations = as_conversations(prompts[:2])
    assert [m["role"] for m in conversations[0]] == ["user"]
    assert prompts[0].strip() in conversations[0][0]["content"]
    # The benchmark's code prompts are held out: none of them is a HumanEval problem.
    assert not any(c.lower() in p.lower() for c in CODE_PROMPTS for p in prompts)
