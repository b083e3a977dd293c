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
