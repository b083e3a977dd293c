"""Chat requests composed from human-written templates: `python -m gorgon.training.compose OUT.json --n N`.

A 135M model asked to write user requests (Magpie, `gorgon distill --synthesize`) writes odd ones, and heads
trained on the answers to odd requests learn an odd style: measured on the embedded model in sessions 2-3
(tune-tree and a one-off script), head 0 accepted 0.36 of its drafts on held-out synthesised requests but 0.20-0.24 on ordinary chat requests. These templates
are everyday requests of the kinds people send a chat assistant (explain, write, advise, compare, plan,
compute, code...), with slots filled at random, so the model answers the requests it will really be sent.

`--follow-ups F` gives a fraction F of the conversations a second user turn fitting the first (see
`FOLLOW_UPS`); `gorgon distill` answers both.

Every template and slot value was written for Gorgon; none comes from a benchmark. `--exclude FILE` (a JSON
list of prompts; the speed benchmark's are always excluded) drops composed requests too close to any of them (word-set
Jaccard), so held-out prompts stay held out even when a template happens to resemble one.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from gorgon.training.everyday import everyday_request

# fmt: off
THINGS = (
    "a microwave oven", "a solar panel", "a vaccine", "a credit card", "the stock market", "a thermostat",
    "noise-cancelling headphones", "GPS", "a hybrid car", "an elevator", "a dishwasher", "a 3D printer",
    "a heat pump", "a hydroelectric dam", "Wi-Fi", "a camera lens", "the immune system", "the human heart",
    "a search engine", "an airplane wing", "a nuclear power plant", "a touchscreen", "a lithium-ion battery",
    "a compass", "a submarine", "a smoke detector", "a washing machine", "a hot air balloon",
    "an espresso machine", "a barcode scanner", "a wind turbine", "sleep", "human memory", "the water cycle",
    "ocean tides", "earthquakes", "rainbows", "volcanoes", "inflation", "photosynthesis", "a blockchain",
    "public-key encryption", "the internet", "a mortgage", "an electric motor", "a bank loan", "the kidneys",
    "a telescope", "a clock", "insurance", "a hearing aid", "antibiotics", "a spam filter", "a QR code",
    "a jet engine", "a pressure cooker", "a lock and key", "the seasons", "thunderstorms", "muscle growth",
)
EXPLAIN_STYLES = (
    "", " in simple terms", " to a complete beginner", " for a high school student", " with an analogy",
    " in two short paragraphs", " step by step", " as if I were five years old", " briefly",
)
CONCEPTS = (
    "machine learning", "democracy", "entropy", "the placebo effect", "a black hole", "DNA",
    "supply and demand", "climate change", "the theory of relativity", "opportunity cost", "evolution",
    "a neural network", "cognitive dissonance", "the greenhouse effect", "a recession", "gravity",
    "quantum computing", "the scientific method", "a stock dividend", "cloud computing", "natural selection",
    "the Pythagorean theorem", "an index fund", "confirmation bias", "the Big Bang", "a carbon footprint",
    "mindfulness", "a budget deficit", "plate tectonics", "osmosis", "the law of diminishing returns",
    "an API", "open-source software", "the electoral college", "biodiversity", "a prime number",
    "a metaphor", "the food chain", "an ecosystem", "a credit score", "herd immunity", "the speed of light",
)
CHARACTERS = (
    "a retired astronaut", "a young baker", "a street musician", "a shy robot", "a detective in Victorian London",
    "a girl who can talk to birds", "an old fisherman", "a time traveller", "a small-town librarian",
    "a dragon who is afraid of fire", "a nervous first-day teacher", "a cat who wants to be a chef",
    "two rival gardeners", "a lost tourist", "a knight with no horse", "an inventor", "a lonely ghost",
    "a mountain guide", "a grandmother and her grandson", "a pair of twins", "a mail carrier", "a pirate captain",
)
EVENTS = (
    "discovers a hidden door", "loses their memory", "finds a winning lottery ticket",
    "must cross a desert to deliver a letter", "befriends a stray dog", "wakes up in the future",
    "enters a cooking competition", "is stuck in an elevator", "finds an old map", "gets a mysterious phone call",
    "has one day to save their village", "learns to fly", "meets their hero", "misses the last train home",
    "opens a shop that sells dreams", "inherits a strange house", "finds a talking tree",
)
STORY_FORMS = (
    "Write a short story about {c} who {e}.", "Tell me a story about {c} who {e}.",
    "Write a funny story about {c} who {e}.", "Write a 300-word story in which {c} {e}.",
    "Write the opening paragraph of a novel about {c} who {e}.", "Write a bedtime story about {c} who {e}.",
)
POEM_SUBJECTS = (
    "the ocean at night", "rain in the city", "the first snow of winter", "my grandmother's kitchen",
    "friendship", "the moon", "a busy train station", "spring flowers", "growing old", "a summer storm",
    "a cup of coffee", "the stars", "a forgotten toy", "mountains", "a quiet library", "hope", "the sea",
    "a lost love", "a cat sleeping in the sun", "Monday mornings", "the desert", "home",
)
POEM_FORMS = (
    "Write a poem about {s}.", "Write a short rhyming poem about {s}.", "Write a sonnet about {s}.",
    "Write a limerick about {s}.", "Write a free verse poem about {s}.", "Compose a four-line poem about {s}.",
)
RECIPIENTS_PURPOSES = (
    ("my landlord", "asking them to fix a leaking tap"), ("a hiring manager", "following up after an interview"),
    ("my team", "announcing that the project deadline has moved"), ("a customer", "apologising for a late delivery"),
    ("my manager", "asking for a day off next week"), ("a hotel", "asking whether they allow pets"),
    ("my neighbour", "about the noise from their parties"), ("a professor", "asking for a recommendation letter"),
    ("a client", "sending them a price quote"), ("an online shop", "asking for a refund for a broken item"),
    ("my friends", "inviting them to a barbecue"), ("a supplier", "asking for a discount on a large order"),
    ("my child's school", "explaining an absence"), ("the city council", "complaining about potholes"),
    ("a former colleague", "asking to meet for coffee"), ("new employees", "welcoming them to the company"),
    ("a gym", "cancelling my membership"), ("a restaurant", "booking a table for ten people"),
)
EMAIL_FORMS = (
    "Write an email to {r} {p}.", "Draft a short email to {r} {p}.", "Help me write a polite email to {r} {p}.",
    "Write a formal letter to {r} {p}.", "Write a friendly message to {r} {p}.",
)
GOALS = (
    "sleep better", "save money on groceries", "learn to play the guitar", "prepare for a job interview",
    "make friends in a new city", "train for my first marathon", "reduce my screen time",
    "keep my houseplants alive", "write a good CV", "stop procrastinating", "learn a new language quickly",
    "eat more healthily", "be more confident when speaking in public", "get better at chess",
    "organise a small kitchen", "start running", "manage stress at work", "read more books",
    "take better photos with my phone", "negotiate a higher salary", "keep a journal", "wake up earlier",
    "help my child with homework", "travel on a tight budget", "learn to cook", "improve my memory",
    "start a vegetable garden", "be a better listener", "drink more water", "pay off my credit card debt",
)
ADVICE_FORMS = (
    "How can I {g}?", "What are some tips to {g}?", "Give me five tips to {g}.", "I want to {g}. Where do I start?",
    "What is the best way to {g}?", "Can you help me {g}?", "Make a one-week plan to help me {g}.",
)
PAIRS = (
    ("cats", "dogs as pets"), ("renting", "buying a home"), ("Python", "JavaScript for a beginner"),
    ("tea", "coffee"), ("solar power", "wind power"), ("e-books", "paper books"),
    ("living in a city", "living in the countryside"), ("running", "swimming for fitness"),
    ("a laptop", "a tablet for a student"), ("stocks", "bonds"), ("working at a startup", "working at a big company"),
    ("Android", "iPhone"), ("baking", "frying"), ("public schools", "private schools"),
    ("democracy", "monarchy"), ("classical music", "jazz"), ("a gas stove", "an induction cooktop"),
    ("studying alone", "studying in a group"), ("hotels", "holiday rentals"), ("yoga", "pilates"),
)
COMPARE_FORMS = (
    "Compare {a} and {b}.", "What is the difference between {a} and {b}?", "Which is better, {a} or {b}?",
    "What are the main differences between {a} and {b}? Answer in a table.",
)
DEBATES = (
    "nuclear power", "social media for teenagers", "a four-day work week", "living abroad", "homeschooling",
    "working from an office", "self-driving cars", "universal basic income", "school uniforms",
    "space tourism", "online dating", "a vegetarian diet", "open-plan offices", "video games for children",
    "buying a used car", "getting a pet as a student", "learning Latin at school", "cryptocurrencies",
)
DEBATE_FORMS = (
    "What are the pros and cons of {d}?", "Give me the arguments for and against {d}.",
    "Write a short persuasive essay in favour of {d}.", "Is {d} a good idea? Give a balanced answer.",
)
HOW_TOS = (
    "set up a fish tank", "plant tomatoes", "bake bread at home", "iron a shirt", "write a cover letter",
    "back up my phone", "start a compost heap", "tie a tie", "paint a room", "make a budget spreadsheet",
    "clean a laptop keyboard", "learn to juggle", "brew a good cup of tea", "change a light switch",
    "plan a birthday party", "write a haiku", "start a podcast", "knit a scarf", "unclog a sink",
    "make cold brew coffee", "train a puppy to sit", "pack for a week-long trip", "sharpen a kitchen knife",
    "make a paper airplane", "set up a home network", "hang a picture straight", "learn to swim as an adult",
)
HOW_TO_FORMS = (
    "How do I {h}?", "List the steps to {h}.", "Give me step-by-step instructions to {h}.",
    "What do I need to {h}?", "Explain how to {h} for a beginner.",
)
DISHES = (
    "banana bread", "pancakes", "chicken curry", "guacamole", "a lentil salad", "tomato pasta sauce",
    "chocolate chip cookies", "a vegetable stir-fry", "French toast", "hummus", "a simple risotto",
    "homemade pizza", "an omelette", "apple pie", "fried rice", "a Greek salad", "beef stew", "lemonade",
    "mashed potatoes", "a fruit smoothie", "roast chicken", "a bean chili", "carrot cake", "pad thai",
)
DISH_FORMS = (
    "Give me a recipe for {f}.", "How do I make {f}?", "What ingredients do I need for {f}?",
    "Give me an easy recipe for {f} for four people.", "How can I make {f} healthier?",
)
EVENTS_HISTORY = (
    "the fall of the Roman Empire", "the Industrial Revolution", "World War I", "the American Civil War",
    "the Renaissance", "the Apollo 11 moon landing", "the invention of the printing press", "the Cold War",
    "the fall of the Berlin Wall", "the Black Death", "the building of the Great Wall of China",
    "the discovery of penicillin", "the Great Depression", "the voyages of Columbus", "the Meiji Restoration",
    "the end of apartheid in South Africa", "the first Olympic Games", "the invention of the telephone",
    "the civil rights movement in the United States", "the rise of the Mongol Empire",
)
HISTORY_FORMS = (
    "Summarise {v}.", "What were the main causes of {v}?", "What were the consequences of {v}?",
    "Tell me about {v} in a few paragraphs.", "Why was {v} important?", "Give me a timeline of {v}.",
)
PLACES = (
    "Paris", "Tokyo", "Barcelona", "New York", "Lisbon", "Kyoto", "Istanbul", "Prague", "Cape Town",
    "Vienna", "Mexico City", "Edinburgh", "Bangkok", "Amsterdam", "Sydney", "Buenos Aires", "Iceland",
    "the Scottish Highlands", "Morocco", "Vancouver", "Seoul", "Berlin", "Copenhagen", "Peru",
)
TRAVEL_FORMS = (
    "Plan a {n}-day trip to {t}.", "What should I see in {t}?", "What should I pack for a trip to {t} in {m}?",
    "I have {n} days in {t}. What do you recommend?", "What is the best time of year to visit {t}?",
    "What local food should I try in {t}?",
)
MONTHS = ("January", "April", "July", "October", "December")
IDEAS = (
    "a birthday party for a seven-year-old", "a science fair project", "a small business I can start from home",
    "a rainy weekend with kids", "names for a bakery", "a team-building activity", "a date night at home",
    "a school fundraiser", "a blog about cooking", "gifts for a friend who loves hiking",
    "a short film", "a mobile app", "healthy snacks for work", "a garden on a balcony",
    "a themed dinner party", "a YouTube channel", "a community event in my neighbourhood",
)
IDEA_FORMS = (
    "Give me five ideas for {i}.", "Brainstorm some ideas for {i}.", "Suggest ten ideas for {i}.",
    "I need creative ideas for {i}.",
)
QUESTIONS = (
    "What causes the northern lights?", "How far away is the Moon?", "Who invented the light bulb?",
    "Why do cats purr?", "What is the tallest mountain in the world?", "How do bees make honey?",
    "Why do we dream?", "How many bones are in the human body?", "What is the largest ocean?",
    "Why do leaves change colour?", "How do airplanes stay in the air?", "What is the capital of Australia?",
    "Why is the ocean salty?", "How long does it take light to reach Earth from the Sun?",
    "What is the difference between weather and climate?", "Why do we have leap years?",
    "How are rainbows formed?", "What did the Egyptians use the pyramids for?", "How do vaccines work?",
    "Why do onions make you cry?", "What is the speed of sound?", "How does the Moon affect the tides?",
    "Who was Marie Curie?", "What is the Turing test?", "Why do we yawn?", "How do fish breathe?",
)
ROLES = (
    ("a tour guide in Egypt", "Tell me about the pyramids."), ("a personal trainer", "Design a workout for me."),
    ("a medieval knight", "Describe your daily life."), ("a job interviewer", "Ask me three questions."),
    ("a travel agent", "Sell me a holiday in Greece."), ("a famous chef", "Teach me to make pasta."),
    ("Sherlock Holmes", "Explain how you solve a case."), ("a career coach", "Help me choose a career."),
    ("a museum guide", "Describe a famous painting."), ("a pirate", "Tell me about your last voyage."),
    ("a customer support agent", "My internet is not working."), ("a nutritionist", "Review my diet."),
)
ROLE_FORMS = ("Pretend you are {role}. {ask}", "Act as {role}. {ask}", "You are {role}. {ask}")
SENTENCES = (
    "i cant come to the meeting tomorrow because im sick",
    "The product is good but the delivery was very slow and nobody answered my emails.",
    "We has finished the report and sended it to the client yesterday.",
    "Our company make the best shoes in the whole country and everyone love them.",
    "Hey, just wanted to check if you got my message about the thing last week?",
    "The results of the experiment was not what we expected, so we need to do it again.",
    "I am writing to complain about the noise that come from the apartment above mine every night.",
    "Thanks for the gift, it was really nice of you and I like it a lot.",
    "Due to unforeseen circumstances the event has been postponed until further notice.",
    "Climate change is a big problem and we should do something about it now.",
)
TEXT_FORMS = (
    "Rewrite this sentence to sound more professional: \"{x}\"", "Fix the grammar in this sentence: \"{x}\"",
    "Make this more polite: \"{x}\"", "Rewrite this in a casual tone: \"{x}\"",
    "Translate this sentence into French: \"{x}\"", "Paraphrase this sentence: \"{x}\"",
)
ITEMS = (
    ("apple, carrot, banana, potato, grape, onion", "fruits and vegetables"),
    ("eagle, shark, frog, bat, penguin, snake", "mammals, birds, fish, amphibians and reptiles"),
    ("Python, HTML, Java, CSS, C++, SQL", "programming languages and other languages"),
    ("Mars, Moon, Jupiter, Sun, Venus, Titan", "planets, moons and stars"),
    ("piano, violin, drum, flute, guitar, trumpet", "string, wind and percussion instruments"),
    ("iron, oxygen, gold, helium, copper, nitrogen", "metals and gases"),
)
CLASSIFY_FORMS = ("Classify these into {k}: {x}.", "Sort the following into {k}: {x}.")
PROGRAM_TASKS = (
    "reverses the words in a sentence", "counts the vowels in a string", "finds the largest number in a list",
    "converts Celsius to Fahrenheit", "returns the factorial of a number", "checks whether a year is a leap year",
    "sorts a list of dictionaries by a key", "finds the most common word in a text",
    "generates a random password", "checks whether two strings are anagrams", "sums the digits of a number",
    "capitalises the first letter of every word", "finds the second largest number in a list",
    "converts a list of strings to integers", "removes all punctuation from a string",
    "returns the intersection of two lists", "prints a multiplication table",
)
LANGUAGES = ("Python", "Python", "Python", "JavaScript", "Java", "C++", "Go", "Rust")
CODE_FORMS = (
    "Write a {l} function that {t}.", "How do I write a {l} program that {t}?",
    "Write a {l} function that {t}, with comments.", "Write a {l} function that {t} and explain how it works.",
)
# fmt: on


def _math_request(rng: random.Random) -> str:
    """A small arithmetic or algebra question with fresh numbers."""
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(10, 400)
    forms = (
        lambda: f"What is {rng.choice((5, 10, 12, 15, 20, 25, 30, 40))}% of {c}?",
        lambda: f"Solve for x: {a}x + {b} = {a * rng.randint(2, 15) + b}.",
        lambda: f"A car travels {c} km in {b} hours. What is its average speed?",
        lambda: (
            f"If a shirt costs ${c} and is on sale for {rng.choice((10, 20, 25, 30))}% off, what is the "
            "sale price?"
        ),
        lambda: (
            f"I have {c} apples and give away {a}. Then I buy {b} bags of {a} apples. How many do I have?"
        ),
        lambda: f"What is the area of a rectangle that is {a} cm long and {b} cm wide?",
        lambda: (
            f"A recipe for {b} people needs {a * 10} grams of flour. How much do I need for {b + a} people?"
        ),
        lambda: f"Convert {c} minutes into hours and minutes.",
        lambda: f"What is the average of {a}, {b}, {c} and {a + b}?",
        lambda: f"A rectangle has a perimeter of {2 * (a + b)} cm and a length of {a} cm. What is its width?",
        lambda: f"If {b} workers build a wall in {a} days, how long would {b * 2} workers take?",
        lambda: f"What is the probability of rolling a total of {rng.randint(2, 12)} with two dice?",
    )
    return rng.choice(forms)()


def _general_request(rng: random.Random) -> str:
    kind = rng.randrange(17)
    pick = rng.choice
    if kind == 0:
        thing, style = pick(THINGS), pick(EXPLAIN_STYLES)
        if rng.random() < 0.4:
            return f"How does {thing} work{style}?"
        opener, end = pick((("Explain how", "."), ("Can you explain how", "?"), ("Describe how", ".")))
        return f"{opener} {thing} works{style}{end}"
    if kind == 1:
        opener, end = pick((("What is", "?"), ("Explain", "."), ("Can you explain", "?"), ("Define", ".")))
        return f"{opener} {pick(CONCEPTS)}{pick(EXPLAIN_STYLES)}{end}"
    if kind == 2:
        return pick(STORY_FORMS).format(c=pick(CHARACTERS), e=pick(EVENTS))
    if kind == 3:
        return pick(POEM_FORMS).format(s=pick(POEM_SUBJECTS))
    if kind == 4:
        r, p = pick(RECIPIENTS_PURPOSES)
        return pick(EMAIL_FORMS).format(r=r, p=p)
    if kind == 5:
        return pick(ADVICE_FORMS).format(g=pick(GOALS))
    if kind == 6:
        a, b = pick(PAIRS)
        return pick(COMPARE_FORMS).format(a=a, b=b)
    if kind == 7:
        return pick(DEBATE_FORMS).format(d=pick(DEBATES))
    if kind == 8:
        return pick(HOW_TO_FORMS).format(h=pick(HOW_TOS))
    if kind == 9:
        return pick(DISH_FORMS).format(f=pick(DISHES))
    if kind == 10:
        return pick(HISTORY_FORMS).format(v=pick(EVENTS_HISTORY))
    if kind == 11:
        return pick(TRAVEL_FORMS).format(n=rng.randint(2, 7), t=pick(PLACES), m=pick(MONTHS))
    if kind == 12:
        return pick(IDEA_FORMS).format(i=pick(IDEAS))
    if kind == 13:
        return pick(QUESTIONS)
    if kind == 14:
        role, ask = pick(ROLES)
        return pick(ROLE_FORMS).format(role=role, ask=ask)
    if kind == 15:
        if rng.random() < 0.5:
            x, k = pick(ITEMS)
            return pick(CLASSIFY_FORMS).format(x=x, k=k)
        return pick(TEXT_FORMS).format(x=pick(SENTENCES))
    if rng.random() < 0.5:
        return _math_request(rng)
    return pick(CODE_FORMS).format(l=pick(LANGUAGES), t=pick(PROGRAM_TASKS))


CODE_FUNCTIONS = (
    "reverses a linked list",
    "checks whether the parentheses in a string are balanced",
    "finds the longest common prefix of a list of strings",
    "transposes a matrix",
    "counts how often each character appears in a string",
    "converts an integer to its binary representation",
    "rotates a list by k positions",
    "returns the indices of two numbers that add up to a target",
    "finds the missing number in a list of 1 to n",
    "merges overlapping intervals",
    "computes the power set of a list",
    "checks whether a string is a valid IPv4 address",
    "returns the n-th row of Pascal's triangle",
    "finds all permutations of a string",
    "computes the median of a list",
    "chunks a list into pieces of size n",
    "converts a string to title case without using title()",
    "finds the longest word in a sentence",
    "checks whether a number is a perfect square",
    "returns the prime factors of a number",
    "computes the edit distance between two strings",
    "finds the first non-repeating character in a string",
    "validates a Sudoku row",
    "computes the running average of a stream of numbers",
    "converts hex to RGB",
    "finds the kth largest element in a list",
    "groups words that are anagrams of each other",
    "compresses a string like aabccc into a2b1c3",
    "computes the dot product of two vectors",
    "checks whether a binary tree is balanced",
    "computes the depth of a binary tree",
    "converts a dictionary to a query string",
    "finds duplicate files by their size and hash",
    "returns the day of the week for a date",
    "computes the Levenshtein ratio of two words",
    "splits a camelCase string into words",
    "finds the majority element in a list",
)
CODE_ALGORITHMS = (
    "merge sort",
    "insertion sort",
    "heap sort",
    "bubble sort",
    "breadth-first search on a graph",
    "depth-first search on a graph",
    "Dijkstra's algorithm",
    "a binary search tree with insert and search",
    "a queue using two stacks",
    "an LRU cache",
    "a trie for word lookups",
    "a min-heap",
    "the sieve of Eratosthenes",
    "a hash map with separate chaining",
    "topological sort",
    "union-find",
    "the knapsack problem with dynamic programming",
    "matrix multiplication",
    "a circular buffer",
    "run-length encoding",
    "the Caesar cipher",
    "a simple tokenizer for arithmetic expressions",
    "a rate limiter",
    "the Luhn checksum",
    "an event emitter",
)
CODE_CLASSES = (
    "a bank account with deposit and withdraw",
    "a to-do list",
    "a shopping cart",
    "a 2D point with distance",
    "a library that lends books",
    "a temperature sensor reading",
    "a deck of playing cards",
    "a simple timer",
    "a matrix with addition and multiplication",
    "a student with grades and an average",
    "an inventory of items",
    "a parking lot",
    "a rectangle with area and perimeter",
    "a priority queue",
    "a contact book",
)
CODE_HOW_TOS = (
    "read a JSON file",
    "sort a dictionary by value",
    "make an HTTP GET request",
    "handle exceptions properly",
    "read a file line by line",
    "create a virtual environment",
    "format a date as a string",
    "measure how long a function takes",
    "write to a CSV file",
    "parse command-line arguments",
    "run two tasks at the same time",
    "copy a list without changing the original",
    "generate random numbers",
    "join paths in a portable way",
    "check if a key exists in a dictionary",
    "convert a string to a date",
    "remove an item from a list while iterating",
    "read environment variables",
    "log messages to a file",
    "zip two lists together",
    "use list comprehensions",
    "write a decorator",
    "use a context manager",
)
CODE_CONCEPTS = (
    ("a list", "a tuple"),
    ("==", "is"),
    ("a process", "a thread"),
    ("a class", "an object"),
    ("an interface", "an abstract class"),
    ("stack memory", "heap memory"),
    ("let", "var"),
    ("a shallow copy", "a deep copy"),
    ("synchronous", "asynchronous code"),
    ("SQL", "NoSQL databases"),
    ("compiled", "interpreted languages"),
    ("git merge", "git rebase"),
    ("GET", "POST requests"),
    ("recursion", "iteration"),
    ("a set", "a list"),
    ("static typing", "dynamic typing"),
)
SQL_TASKS = (
    "lists the employees who earn more than their manager",
    "counts the orders per month",
    "finds the products that were never ordered",
    "returns the second highest salary",
    "deletes duplicate rows from a table",
    "joins customers with their latest order",
    "computes the average rating per movie",
    "finds users who signed up in the last 30 days",
    "ranks students by their score in each class",
    "finds departments with more than ten employees",
)
SHELL_TASKS = (
    "finds the largest files in a directory",
    "counts the lines in all Python files",
    "backs up a folder into a dated archive",
    "prints the ten most common words in a file",
    "checks whether a website is up",
    "deletes log files older than seven days",
    "monitors the memory usage of a process",
    "downloads a list of URLs from a file",
)
CODE_LANGUAGES = ("Python",) * 6 + (
    "JavaScript",
    "JavaScript",
    "Java",
    "C++",
    "Go",
    "Rust",
    "TypeScript",
    "C",
)


def _code_request(rng: random.Random) -> str:
    kind = rng.randrange(9)
    pick, lang = rng.choice, rng.choice(CODE_LANGUAGES)
    if kind <= 2:
        form = pick(
            (
                "Write a {l} function that {t}.",
                "Write a {l} function that {t}, and explain how it works.",
                "Write a {l} function that {t}. Include a few test cases.",
                "How do I write a function in {l} that {t}?",
                "Write an efficient {l} function that {t} and give its time complexity.",
            )
        )
        return form.format(l=lang, t=pick(CODE_FUNCTIONS))
    if kind == 3:
        form = pick(
            ("Implement {a} in {l}.", "Write {a} in {l} with comments.", "Explain and implement {a} in {l}.")
        )
        return form.format(a=pick(CODE_ALGORITHMS), l=lang)
    if kind == 4:
        form = pick(("Write a {l} class for {c}.", "Create a {l} class that models {c}."))
        return form.format(l=lang, c=pick(CODE_CLASSES))
    if kind == 5:
        form = pick(
            ("How do I {h} in {l}?", "Show me how to {h} in {l}.", "What is the best way to {h} in {l}?")
        )
        return form.format(h=pick(CODE_HOW_TOS), l=pick(("Python", "Python", "JavaScript", "Java", "Go")))
    if kind == 6:
        a, b = pick(CODE_CONCEPTS)
        return pick(
            ("What is the difference between {a} and {b}?", "Explain {a} versus {b} with an example.")
        ).format(a=a, b=b)
    if kind == 7:
        return f"Write a SQL query that {pick(SQL_TASKS)}."
    return f"Write a {pick(('bash script', 'shell command', 'Python script'))} that {pick(SHELL_TASKS)}."


# Second turns: what people send after a first answer. Chat is often two turns (and so are chat benchmarks),
# so heads may learn from answers that build on an earlier one, and a second turn adds answers without new
# templates (the general ones give only ~2400 distinct requests). Its price: the first exchange is prefilled
# again for the second answer (no prefix cache): by estimate ~3x the compute per kept token of a sampled
# re-answer (not measured).
FOLLOW_UPS = (
    "Can you make that shorter?",
    "Can you explain that in simpler terms?",
    "Can you give me an example?",
    "Thanks! Can you summarise that in three bullet points?",
    "Can you go into more detail?",
    "What are the most common mistakes people make with this?",
    "Why is that?",
    "Can you say more about that?",
    "Rewrite that in a more formal tone.",
    "Rewrite that in a friendlier, more casual tone.",
    "Can you turn that into a numbered list?",
    "What would you add if you had more space?",
    "Which part of that is the most important, and why?",
    "Can you explain that to a ten-year-old?",
    "Is there anything I should be careful about?",
    "What is a good next step after this?",
    "Can you give me two more examples?",
    "Great, thank you. Can you put that in a short table?",
    "How would you explain this to someone who disagrees?",
    "Can you end with a one-sentence summary?",
)
CREATIVE_FOLLOW_UPS = (
    "Now give it a different ending.",
    "Make it funnier.",
    "Make it shorter.",
    "Can you make it rhyme?",
    "Give it a title and explain why you chose it.",
    "Rewrite it for a young child.",
    "Continue the story.",
    "Make it more dramatic.",
    "Tell it from a different point of view.",
    "What is the main theme of what you wrote?",
)
CODE_FOLLOW_UPS = (
    "Can you add comments to the code?",
    "How would I test this?",
    "What is the time complexity?",
    "Can you make it handle invalid input?",
    "Can you rewrite it without using any libraries?",
    "Can you explain the code line by line?",
    "How could I make it faster?",
    "Can you write it in JavaScript?",
    "Can you add type hints?",
    "What edge cases should I think about?",
)
_CREATIVE = re.compile(r"\b(story|poem|sonnet|limerick|verse|novel)\b", re.IGNORECASE)
_CODE = re.compile(
    r"\b(function|code|script|class|SQL|query|implement|program|Python|JavaScript|Java|C\+\+|Go|Rust)\b"
)


def follow_up(first: str, rng: random.Random) -> str:
    """A second user turn that fits the first request (a story gets a rewrite, code a test...)."""
    if _CREATIVE.search(first):
        pool = CREATIVE_FOLLOW_UPS
    elif _CODE.search(first):
        pool = CODE_FOLLOW_UPS + FOLLOW_UPS[:4]
    else:
        pool = FOLLOW_UPS
    return rng.choice(pool)


def conversations(
    texts: list[str],
    follow_ups: float = 0.0,
    seed: int = 0,
    exclude: Iterable[str] = (),
    threshold: float = 0.5,
) -> list[list[dict]]:
    """One conversation per request; a fraction `follow_ups` of them get a second user turn (none too close
    to an `exclude` prompt). The first turns are `texts` unchanged, whatever `follow_ups` is."""
    rng = random.Random(seed + 7919)  # its own stream: the first turns do not depend on it
    held_out = [words(p) for p in exclude]
    out = []
    for text in texts:
        conv = [{"role": "user", "content": text}]
        if rng.random() < follow_ups:
            second = follow_up(text, rng)
            if not too_close(second, held_out, threshold):
                conv.append({"role": "user", "content": second})
        out.append(conv)
    return out


FAMILIES = {"general": _general_request, "code": _code_request, "everyday": everyday_request}

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def too_close(text: str, held_out: Iterable[frozenset[str]], threshold: float) -> bool:
    """Whether `text` shares at least `threshold` of its word set (Jaccard) with any held-out prompt."""
    w = words(text)
    return any(len(w & h) / max(1, len(w | h)) >= threshold for h in held_out)


def compose(
    n: int, family: str = "general", seed: int = 0, exclude: Iterable[str] = (), threshold: float = 0.5
) -> list[str]:
    """`n` distinct requests (fewer if the templates run out), none too close to an `exclude` prompt."""
    make = FAMILIES[family]
    rng = random.Random(seed)
    held_out = [words(p) for p in exclude]
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n and attempts < 50 * n + 1000:
        attempts += 1
        text = " ".join(make(rng).split())
        if text in seen or too_close(text, held_out, threshold):
            continue
        seen.add(text)
        out.append(text)
    return out


def held_out_prompts(data: list) -> list[str]:
    """The prompts of an `--exclude` file: a JSON list of prompts, or of conversations (their user turns;
    this module's own output is one)."""
    prompts: list[str] = []
    for item in data:
        if isinstance(item, str):
            prompts.append(item)
        else:
            prompts += [m["content"] for m in item if m.get("role") == "user"]
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON list of one-message conversations, for `gorgon distill`")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--family", default="general", choices=sorted(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="JSON list of held-out prompts, or of conversations (repeatable)",
    )
    parser.add_argument("--exclude-threshold", type=float, default=0.5, help="word-set Jaccard")
    parser.add_argument(
        "--follow-ups", type=float, default=0.0, help="fraction of conversations given a second user turn"
    )
    args = parser.parse_args()
    from gorgon.bench.prompts import PROMPT_SETS

    held_out = [p for prompts in PROMPT_SETS.values() for p in prompts]  # always held out
    for f in args.exclude:
        held_out += held_out_prompts(json.loads(Path(f).read_text(encoding="utf-8")))
    texts = compose(args.n, args.family, args.seed, held_out, args.exclude_threshold)
    convs = conversations(texts, args.follow_ups, args.seed, held_out, args.exclude_threshold)
    Path(args.output).write_text(json.dumps(convs, ensure_ascii=False, indent=1), encoding="utf-8")
    second = sum(len(c) > 1 for c in convs)
    print(f"wrote {len(texts)} requests to {args.output} ({second} with a second turn)")


if __name__ == "__main__":
    main()
