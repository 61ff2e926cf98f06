"""A built-in instruction set in chat format (``data.source=chat``), correct by construction.

Every answer is computed from the question's own parameters (a conversion factor, a word, a list),
so the set needs no download and no checking. Conversations have 1-3 user/assistant exchanges;
follow-ups refer back to the previous answer ("And in millimetres?", "Now reverse it"), which is
what makes multi-turn masking matter. Generation is deterministic in ``(n, seed)``.
"""
from __future__ import annotations

import random
from typing import Callable

SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer briefly and exactly.",
    "You are a precise assistant. Give short, correct answers.",
)
WORDS = (
    "apple banana cherry dragon engine forest garden harbor island jungle kettle lantern meadow needle orange pepper "
    "quartz river saddle tiger umbrella violin window yellow zebra bridge candle desert falcon glacier hammer mirror "
    "number pillow rocket silver ticket velvet wander basket copper marble planet thunder whisper"
).split()
DEFINITIONS = {
    "a prime number": "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
    "a palindrome": "A palindrome is a word or phrase that reads the same backwards as forwards, like 'level'.",
    "an even number": "An even number is an integer that is divisible by 2 with no remainder.",
    "a noun": "A noun is a word that names a person, place, thing or idea.",
    "a verb": "A verb is a word that describes an action, state or occurrence.",
    "a triangle": "A triangle is a polygon with three sides and three angles.",
    "an acronym": "An acronym is a word formed from the first letters of other words, like 'NASA'.",
    "a synonym": "A synonym is a word that means the same or nearly the same as another word.",
    "photosynthesis": "Photosynthesis is the process by which plants use light, water and carbon dioxide to make sugar and oxygen.",
    "a sorted list": "A sorted list is a list whose items are arranged in order, for example from smallest to largest.",
}
# (unit, other unit, factor: 1 unit = factor other units, a finer unit for the follow-up, its factor from `other`)
CONVERSIONS = (
    ("kilometres", "metres", 1000, "centimetres", 100),
    ("metres", "centimetres", 100, "millimetres", 10),
    ("hours", "minutes", 60, "seconds", 60),
    ("kilograms", "grams", 1000, "milligrams", 1000),
    ("days", "hours", 24, "minutes", 60),
    ("litres", "millilitres", 1000, None, None),
    ("weeks", "days", 7, "hours", 24),
)

Turn = tuple[str, str]  # (user, assistant)


def _conversion(rng: random.Random) -> list[Turn]:
    unit, other, factor, finer, finer_factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 50)
    turns = [(f"How many {other} are in {n} {unit}?", f"{n} {unit} is {n * factor} {other}.")]
    if finer and rng.random() < 0.5:
        turns.append((f"And how many {finer} is that?", f"{n * factor} {other} is {n * factor * finer_factor} {finer}."))
    return turns


def _temperature(rng: random.Random) -> list[Turn]:
    c = 5 * rng.randint(-8, 20)  # multiples of 5 convert to whole Fahrenheit degrees
    return [(f"Convert {c} degrees Celsius to Fahrenheit.", f"{c} degrees Celsius is {c * 9 // 5 + 32} degrees Fahrenheit.")]


def _word(rng: random.Random) -> list[Turn]:
    word = rng.choice(WORDS)
    first = rng.choice(["reverse", "upper", "length", "count"])
    if first == "reverse":
        turns = [(f"Reverse the word '{word}'.", f"'{word}' reversed is '{word[::-1]}'.")]
    elif first == "upper":
        turns = [(f"Write '{word}' in uppercase.", word.upper())]
    elif first == "length":
        turns = [(f"How many letters are in the word '{word}'?", f"'{word}' has {len(word)} letters.")]
    else:
        letter = rng.choice(sorted(set(word)) + ["z", "q"])
        count = word.count(letter)
        times = "time" if count == 1 else "times"
        turns = [(f"How many times does the letter '{letter}' appear in '{word}'?", f"The letter '{letter}' appears {count} {times} in '{word}'.")]
    if first != "reverse" and rng.random() < 0.4:
        turns.append(("Now reverse the word.", f"'{word}' reversed is '{word[::-1]}'."))
    return turns


def _numbers(rng: random.Random) -> list[Turn]:
    values = rng.sample(range(1, 100), rng.randint(3, 7))
    shown = ", ".join(map(str, values))
    kind = rng.choice(["asc", "desc", "max", "min", "sum"])
    if kind in ("asc", "desc"):
        order = "ascending" if kind == "asc" else "descending"
        turns = [(f"Sort these numbers in {order} order: {shown}", ", ".join(map(str, sorted(values, reverse=kind == "desc"))))]
    elif kind in ("max", "min"):
        word = "largest" if kind == "max" else "smallest"
        turns = [(f"What is the {word} number in this list: {shown}?", f"The {word} number is {(max if kind == 'max' else min)(values)}.")]
    else:
        turns = [(f"What is the sum of {shown}?", f"The sum is {sum(values)}.")]
    if rng.random() < 0.3:
        turns.append(("How many numbers were in the list?", f"There were {len(values)} numbers."))
    return turns


def _parity(rng: random.Random) -> list[Turn]:
    n = rng.randint(2, 200)
    prime = all(n % d for d in range(2, int(n**0.5) + 1))
    ask = rng.choice(["even", "prime"])
    if ask == "even":
        return [(f"Is {n} an even number?", f"{'Yes' if n % 2 == 0 else 'No'}, {n} is {'even' if n % 2 == 0 else 'odd'}.")]
    return [(f"Is {n} a prime number?", f"{'Yes' if prime else 'No'}, {n} is {'a prime' if prime else 'not a prime'} number.")]


def _definition(rng: random.Random) -> list[Turn]:
    term = rng.choice(sorted(DEFINITIONS))
    return [(rng.choice([f"What is {term}?", f"Define {term}.", f"Briefly explain what {term} is."]), DEFINITIONS[term])]


TOPICS: tuple[Callable[[random.Random], list[Turn]], ...] = (_conversion, _temperature, _word, _numbers, _parity, _definition)


def make_conversation(rng: random.Random) -> list[dict[str, str]]:
    """One conversation: an optional system prompt, then 1-3 exchanges (a topic's follow-ups stay together)."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    turns: list[Turn] = []
    wanted = rng.choice([1, 1, 2, 3])
    while len(turns) < wanted:
        turns += rng.choice(TOPICS)(rng)
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def generate(n: int, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    rng = random.Random(f"chat-{seed}")
    return [{"messages": make_conversation(rng)} for _ in range(n)]
