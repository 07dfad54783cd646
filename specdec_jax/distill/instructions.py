"""Templated instructions: more (and more varied) prompts for on-policy data.

The prompt suite has a few dozen prompts; a draft trained only on their
completions overfits them. These templates cover the same kinds of requests
(explain, list, rewrite, code, maths, chat) over many topics. None of them is
a held-out prompt, so evaluation stays clean.
"""

import itertools

import numpy as np

TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Give three interesting facts about {topic}.",
    "Write a short paragraph about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Summarize what you know about {topic} in two sentences.",
    "Write a haiku about {topic}.",
    "How would you explain {topic} to a ten-year-old?",
    "List five questions a student might ask about {topic}.",
    "Write a short story that involves {topic}.",
    "What is the history of {topic}? Keep it brief.",
    "Give me a step-by-step guide to getting started with {topic}.",
    "Compare {topic} with something similar and explain the difference.",
    "Write a friendly email inviting a colleague to a talk about {topic}.",
    "What are common misconceptions about {topic}?",
    "Describe {topic} using an analogy.",
    "Write a tweet announcing a new book about {topic}.",
)

TOPICS = (
    "photosynthesis", "black holes", "the French Revolution", "machine learning",
    "climate change", "the human heart", "volcanoes", "renewable energy",
    "the stock market", "honeybees", "the internet", "vaccines", "chess",
    "the Roman Empire", "electric cars", "sleep", "coffee", "the moon landing",
    "recycling", "gravity", "the water cycle", "democracy", "jazz music",
    "public libraries", "bread baking", "rainforests", "earthquakes",
    "the printing press", "meditation", "solar panels", "octopuses",
    "time management", "the Olympic Games", "DNA", "cloud computing",
    "learning a new language", "marathon running", "the periodic table",
    "urban gardening", "antibiotics",
)

CODE_TASKS = (
    "reverses a string", "checks whether a number is prime",
    "returns the n-th Fibonacci number", "counts the vowels in a string",
    "merges two sorted lists", "removes duplicates from a list while keeping order",
    "computes the factorial of a number", "finds the largest element of a list",
    "checks whether a string is a palindrome", "converts Celsius to Fahrenheit",
    "flattens a nested list", "counts word frequencies in a text",
)

CODE_TEMPLATES = (
    "Write a Python function that {task}.",
    "Write a JavaScript function that {task}, with a short comment.",
)

MATH_TEMPLATES = (
    "What is {a} times {b}? Show your work.",
    "A shop sells pens at {a} cents each. How much do {b} pens cost in dollars?",
    "If a train travels {a} km in {b} hours, what is its average speed?",
    "What is the sum of all integers from 1 to {a}?",
)


def templated_instructions(count: int, seed: int) -> list[str]:
  """``count`` distinct instructions, a deterministic function of ``seed``."""
  pool = [t.format(topic=topic) for t, topic in itertools.product(TEMPLATES, TOPICS)]
  pool += [t.format(task=task) for t, task in itertools.product(CODE_TEMPLATES, CODE_TASKS)]
  rng = np.random.default_rng(seed)
  for template in MATH_TEMPLATES:
    for _ in range(12):
      a, b = (int(x) for x in rng.integers(3, 99, size=2))
      pool.append(template.format(a=a, b=b))
  pool = list(dict.fromkeys(pool))
  order = rng.permutation(len(pool))
  return [pool[i] for i in order[:count]]
