"""Built-in seeds that steer Magpie synthesis toward varied instructions: system prompts, task types (each with
openers a user turn may start with) and topics, grouped in families (`--topic general | code | math`).

Left alone, a small model asked to write "a user message" writes the same few requests again and again; a
random system prompt plus a task and topic hint spreads the samples. Nothing here comes from a benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful AI assistant.",
    "You are a knowledgeable assistant who gives clear, accurate answers.",
    "You are a friendly assistant. Answer the user's questions thoroughly.",
    "You are an expert tutor who explains things step by step.",
    "You are a creative writing assistant.",
    "You are a senior software engineer who helps users with programming.",
    "You are a patient math teacher.",
    "You are a practical assistant who gives concise, actionable advice.",
    "You are an assistant that helps people with everyday tasks.",
    "You are a careful assistant that answers questions about science and history.",
    "You are a professional editor who helps people improve their writing.",
)

# Ways of telling the model what the user is about to ask; {task} and {topic} are filled in.
HINT_FORMS = (
    "The user will ask you to {task} related to {topic}.",
    "In this conversation the user wants you to {task}. The subject is {topic}.",
    "Expect a request to {task} on the topic of {topic}.",
    "The user needs help: they want you to {task}, about {topic}.",
)

# (what the user wants, openers a user turn asking for it may start with)
GENERAL_TASKS = (
    ("write a short story", ("Write a short story", "Tell me a story")),
    ("write a poem", ("Write a poem", "Compose a short poem")),
    ("write an email", ("Write an email", "Draft an email", "Help me write an email")),
    ("write a letter", ("Write a letter", "Help me write a letter")),
    ("write a blog post or an essay", ("Write a blog post", "Write an essay", "Write an article")),
    ("write a speech or a toast", ("Write a speech", "Write a short toast")),
    ("write a product description or an advertisement", ("Write a product description", "Write an ad")),
    ("explain a concept simply", ("Explain", "Can you explain", "What is")),
    ("explain how something works", ("How does", "Explain how", "Can you describe how")),
    ("explain why something happens", ("Why does", "Why do", "Why is")),
    ("answer a factual question", ("What", "Who", "When did", "Where is")),
    ("compare two things", ("Compare", "What is the difference between", "Which is better")),
    ("give a list of items or ideas", ("List", "Give me a list of", "Name")),
    ("brainstorm ideas", ("Brainstorm", "Give me ideas for", "Suggest some ideas for")),
    ("give practical advice", ("How can I", "What should I do", "Any tips for", "I need advice on")),
    ("give step-by-step instructions", ("How do I", "What are the steps to", "Walk me through")),
    ("summarise a text that the user provides", ("Summarize the following", "Summarize this text:")),
    ("rewrite or improve a text that the user provides", ("Rewrite this", "Improve the following", "Edit")),
    ("make a text more formal or more casual", ("Make this more formal:", "Rewrite this casually:")),
    ("classify or categorise items", ("Classify", "Sort these into categories:", "Which of these")),
    ("extract information from a text that the user provides", ("Extract", "From the text below,")),
    ("make a plan or a schedule", ("Make a plan for", "Create a schedule for", "Plan")),
    ("recommend something", ("Recommend", "Can you recommend", "What are some good")),
    ("give pros and cons", ("What are the pros and cons of", "List the advantages and disadvantages of")),
    ("solve a math word problem", ("Solve", "If a", "A train", "Calculate")),
    ("solve a logic puzzle or riddle", ("Solve this riddle:", "Here is a puzzle:")),
    ("write a piece of code", ("Write a Python function", "Write a program", "Write code")),
    ("explain a piece of code", ("Explain this code:", "What does this code do?")),
    ("create a recipe or a meal idea", ("Give me a recipe for", "How do I make", "What can I cook")),
    ("create a quiz or questions", ("Create a quiz about", "Write five questions about")),
    ("write a dialogue or a script", ("Write a dialogue between", "Write a short script")),
    ("describe something vividly", ("Describe", "Paint a picture of")),
    ("give an opinion or an argument", ("Argue for", "What do you think about", "Make the case for")),
    ("role-play a character", ("Pretend you are", "Act as", "Imagine you are")),
    ("define a word or a term", ("Define", "What does the word", "What is the meaning of")),
    ("create a title, slogan or name", ("Suggest a title for", "Come up with a name for", "Write a slogan")),
)

# fmt: off
GENERAL_TOPICS = (
    "science", "physics", "chemistry", "biology", "astronomy", "the human body", "health and fitness",
    "nutrition", "mental health", "medicine", "history", "ancient civilisations", "world war II",
    "geography", "travel", "a city trip", "camping and hiking", "cooking", "baking", "vegetarian food",
    "coffee and tea", "business", "marketing", "startups", "personal finance", "investing", "economics",
    "careers and job interviews", "education", "studying for exams", "learning a language", "literature",
    "poetry", "film and television", "music", "art and painting", "photography", "fashion", "sports",
    "football", "chess", "video games", "board games", "technology", "smartphones", "artificial intelligence",
    "the internet", "cybersecurity", "programming", "data analysis", "mathematics", "statistics",
    "philosophy", "psychology", "relationships", "friendship", "parenting", "pets", "dogs and cats",
    "gardening", "home improvement", "cleaning and organising", "climate and the environment", "recycling",
    "energy", "cars", "space exploration", "oceans", "animals", "plants", "weather", "law", "politics",
    "religion and mythology", "holidays and celebrations", "weddings", "productivity", "time management",
    "public speaking", "writing skills", "social media", "shopping", "real estate", "architecture",
    "engineering", "inventions", "famous people", "languages and linguistics", "culture and traditions",
)
# fmt: on

CODE_TASKS = (
    ("write a function", ("Write a Python function", "Write a function", "Implement a function")),
    ("write a small program or script", ("Write a program", "Write a script", "Create a command-line tool")),
    ("debug code that the user provides", ("Why does this code", "Fix this code:", "I get an error")),
    ("explain code that the user provides", ("Explain this code:", "What does this function do?")),
    ("explain a programming concept", ("What is", "Explain", "What is the difference between")),
    ("optimise code for speed or memory", ("How can I make this faster?", "Optimize this code:")),
    ("refactor code to be cleaner", ("Refactor this code:", "How can I clean up this code?")),
    ("write unit tests", ("Write unit tests for", "How do I test")),
    ("write a SQL query", ("Write a SQL query", "How do I query")),
    ("write a regular expression", ("Write a regex", "Write a regular expression")),
    ("implement an algorithm", ("Implement", "Write an algorithm", "How do I implement")),
    (
        "design a data structure or a class",
        ("Design a class", "Create a class", "Implement a data structure"),
    ),
    ("use a library or an API", ("How do I use", "Show me how to use", "Write code that uses")),
    (
        "convert code from one language to another",
        ("Convert this", "Translate this code to", "Rewrite this in"),
    ),
    ("write a shell command or a script", ("Write a bash script", "What command", "How do I use git to")),
    (
        "answer a question about tooling or setup",
        ("How do I install", "How do I set up", "How do I configure"),
    ),
)

# fmt: off
CODE_TOPICS = (
    "Python", "JavaScript", "TypeScript", "Java", "C", "C++", "C#", "Go", "Rust", "Ruby", "PHP", "Kotlin",
    "Swift", "SQL", "bash", "HTML and CSS", "React", "Node.js", "Django", "Flask", "pandas", "NumPy",
    "machine learning with PyTorch", "string manipulation", "lists and arrays", "dictionaries and hash maps",
    "sorting", "searching", "recursion", "dynamic programming", "graphs", "trees", "linked lists",
    "file input and output", "JSON parsing", "dates and times", "regular expressions", "error handling",
    "concurrency and threads", "async programming", "object-oriented design", "testing", "git",
    "REST APIs", "databases", "performance", "memory management", "command-line tools", "web scraping",
)
# fmt: on

MATH_TASKS = (
    ("solve a math word problem", ("Solve", "If a", "A store", "How many")),
    ("solve an equation", ("Solve for x:", "Solve the equation", "Find x if")),
    ("explain a math concept", ("Explain", "What is", "Why is")),
    ("prove a statement", ("Prove that", "Show that", "Why is it true that")),
    ("calculate something step by step", ("Calculate", "What is", "Compute")),
    ("check a solution that the user provides", ("Is this correct?", "Check my answer:")),
)

# fmt: off
MATH_TOPICS = (
    "arithmetic", "fractions", "percentages", "ratios", "algebra", "linear equations", "quadratic equations",
    "geometry", "triangles", "circles", "area and volume", "trigonometry", "probability", "statistics",
    "combinatorics", "number theory", "prime numbers", "sequences and series", "calculus", "derivatives",
    "integrals", "limits", "matrices", "vectors", "logarithms", "exponents", "interest and money", "speed and time",
    "unit conversion", "logic",
)
# fmt: on

FAMILIES = {
    "general": (GENERAL_TASKS, GENERAL_TOPICS),
    "code": (CODE_TASKS, CODE_TOPICS),
    "math": (MATH_TASKS, MATH_TOPICS),
}
# system: task and topic hint in the system prompt; user: that hint, and the user turn starts with an opener
# that fits the task; none: a varied system prompt only (plain Magpie); mixed: one of the three per sample.
HINT_MODES = ("mixed", "system", "user", "none")


@dataclass(frozen=True)
class Seed:
    """What one Magpie sample is seeded with."""

    system: str | None
    task: str | None = None
    topic: str | None = None
    opener: str = ""  # the user turn starts with this (hint mode "user")
    mode: str = "none"


class SeedSampler:
    """Draws seeds for a family of tasks and topics (or topics of the user's own)."""

    def __init__(self, family: str = "general", topics: tuple[str, ...] | None = None, mode: str = "mixed"):
        if mode not in HINT_MODES:
            raise ValueError(f"--hint-mode must be one of {', '.join(HINT_MODES)}, got {mode!r}")
        # A name that is not a family is a free-text topic: general tasks about it.
        self.tasks, self.topics = FAMILIES.get(family, (GENERAL_TASKS, (family,)))
        if topics:
            self.topics = topics
        self.steered = family != "general" or bool(topics)
        if self.steered and mode == "none":
            raise ValueError("--hint-mode none ignores --topic and --seed-file: use mixed, system or user")
        self.mode = mode

    def draw(self, rng: random.Random) -> Seed:
        mode = self.mode
        if mode == "mixed":  # a steered sampler (code, a seed file...) always gives its hint
            mode = rng.choice(("system", "user") if self.steered else ("none", "system", "user"))
        base = rng.choice(SYSTEM_PROMPTS)
        if mode == "none":
            return Seed(system=base)
        task, openers = rng.choice(self.tasks)
        topic = rng.choice(self.topics)
        hint = rng.choice(HINT_FORMS).format(task=task, topic=topic)
        opener = rng.choice(openers) if mode == "user" else ""
        return Seed(system=f"{base} {hint}", task=task, topic=topic, opener=opener, mode=mode)


def read_seed_file(path: str | Path) -> tuple[str, ...]:
    """Topics or seeds, one per line (blank lines and `#` comments skipped), or a JSON list of strings."""
    import json

    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        items = json.loads(text)
        if not all(isinstance(x, str) for x in items):
            raise ValueError(f"{path}: a JSON seed file must be a list of strings")
    else:
        items = [
            line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
        ]
    topics = tuple(x.strip() for x in items if x.strip())
    if not topics:
        raise ValueError(f"{path} holds no topics")
    return topics
