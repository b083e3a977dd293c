"""Chat prompts for speed benchmarks: written for Gorgon, never used for training or tuning."""

CHAT_PROMPTS = [
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three practical tips for staying focused while working from home?",
    "Compare the advantages of trains and airplanes for a 500 km trip.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Give me a simple recipe for a vegetable soup.",
    "Why is the sky blue? Answer for a ten-year-old.",
    "Draft a polite email asking a colleague to review my report by Friday.",
    "Summarise the main causes of the French Revolution.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a weekend itinerary for a first visit to Rome.",
    "How does compound interest work? Give an example with numbers.",
    "Write a haiku about autumn leaves and then explain its imagery.",
    "List the steps to change a flat tyre on a bicycle.",
    "What are the pros and cons of electric cars?",
    "Explain recursion to a beginner programmer with an example.",
]

# Coding prompts for speed benchmarks of code adapters: written for Gorgon, never used for training.
CODE_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Implement binary search in Python and explain its complexity.",
    "Write a Python class for a stack with push, pop and peek methods.",
    "Write a function that counts the words in a text file in Python.",
    "Write a Python function that checks whether a number is prime.",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Implement quicksort in Python.",
    "Write a Python function that parses a CSV line with quoted fields.",
    "Write a bash script that renames all .txt files in a folder to .md.",
    "Write a Python function that computes the greatest common divisor of two numbers.",
    "Write a Python generator that yields the lines of a file in reverse order.",
    "Write a Python function that converts a Roman numeral to an integer.",
]

PROMPT_SETS = {"chat": CHAT_PROMPTS, "code": CODE_PROMPTS}
