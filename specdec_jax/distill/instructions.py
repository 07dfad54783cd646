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


# ----- instructions the target writes itself ---------------------------------------

SELF_INSTRUCT_TEMPERATURE = 1.0
SELF_INSTRUCT_TOP_P = 0.95
_PLACEHOLDER = "\x00INSTRUCTION\x00"
_MIN_WORDS = 3


def pre_query_prefix(tokenizer, chat: bool) -> list[int]:
  """Token ids that stand before a user's words: the chat template up to the
  user turn's content (Magpie, Xu et al. 2024), or BOS for a plain model."""
  if chat:
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}],
                                         add_generation_prompt=False)
    if _PLACEHOLDER not in text:
      raise ValueError("the chat template does not show the user's message; "
                       "config.distill.num_self_instruct needs one")
    prefix = tokenizer.encode(text[:text.index(_PLACEHOLDER)])
    if prefix:
      return prefix
    # A template that puts nothing before the user's words: start from BOS.
  if tokenizer.bos_id is None:
    raise ValueError("config.distill.num_self_instruct needs a chat template "
                     "(config.chat=True) or a tokenizer with a BOS token")
  return [tokenizer.bos_id]


def self_instruct(generator, target_params, tokenizer, prefix_ids: list[int], count: int,
                  seed: int, exclude=(), log=print) -> list[str]:
  """``count`` distinct instructions sampled from the target itself.

  The target continues the pre-query prefix (``pre_query_prefix``) at
  temperature 1, top-p 0.95, so it writes what it takes a user's request to
  be: requests in its own style, as varied as it is, for data that no fixed
  template list covers. Samples that hit the token cap before ending, have
  fewer than 3 words, repeat an earlier one or are in ``exclude`` (the
  held-out prompts) are dropped and more are drawn, in rounds of
  ``generator.batch_size``. Deterministic in ``seed``.

  Raises:
    ValueError: fewer than ``count`` usable instructions after 8x as many samples.
  """
  excluded = {e.strip() for e in exclude}
  kept, seen, drawn = [], set(), 0
  while len(kept) < count:
    if drawn >= 8 * count + generator.batch_size:
      raise ValueError(f"self-instruct: only {len(kept)} of {count} usable instructions "
                       f"after {drawn} samples")
    batch = generator.batch_size
    result = generator.generate(target_params, {}, [prefix_ids] * batch,
                                seeds=[(seed * 1_000_003 + drawn + i) % 2**32 for i in range(batch)],
                                temperature=SELF_INSTRUCT_TEMPERATURE, top_p=SELF_INSTRUCT_TOP_P)
    drawn += batch
    for row in result.rows:
      if row.finish_reason != "eos":
        continue
      text = tokenizer.decode(row.output_ids[:-1], skip_special=True).strip()
      if len(text.split()) < _MIN_WORDS or text in seen or text in excluded:
        continue
      seen.add(text)
      kept.append(text)
    log(f"data: self-instruct {min(len(kept), count)}/{count} instructions ({drawn} sampled)")
  return kept[:count]
