"""A small built-in conversation set, so the default fine-tuning command runs on a fresh machine.

Short question/answer chats (a few with a system message or two turns), in the JSONL layout the
data reader takes: one `{"messages": [...]}` per conversation.
"""

from __future__ import annotations

_PAIRS = (
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Spain?", "Madrid."),
    ("What is the capital of Egypt?", "Cairo."),
    ("What is the capital of Canada?", "Ottawa."),
    ("What is 2 + 2?", "4."),
    ("What is 3 + 5?", "8."),
    ("What is 7 - 4?", "3."),
    ("What is 6 * 7?", "42."),
    ("What is 10 / 2?", "5."),
    ("What color is the sky on a clear day?", "Blue."),
    ("What color is grass?", "Green."),
    ("What color are ripe bananas?", "Yellow."),
    ("How many days are in a week?", "Seven."),
    ("How many legs does a spider have?", "Eight."),
    ("How many months are in a year?", "Twelve."),
    ("What is the opposite of hot?", "Cold."),
    ("What is the opposite of up?", "Down."),
    ("What is the opposite of open?", "Closed."),
    ("Say hello.", "Hello!"),
    ("Say goodbye.", "Goodbye!"),
    ("Spell cat backwards.", "tac"),
    ("Spell dog backwards.", "god"),
    ("What do bees make?", "Honey."),
    ("What do cows drink?", "Water."),
    ("Which planet do we live on?", "Earth."),
    ("What is frozen water called?", "Ice."),
    ("Name a fruit that is red.", "A strawberry."),
    ("What animal says meow?", "A cat."),
)

_MORE = (
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What is the largest ocean?"},
     {"role": "assistant", "content": "Pacific."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What gas do plants take in?"},
     {"role": "assistant", "content": "CO2."}],
    [{"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "1, 2, 3."},
     {"role": "user", "content": "Now to five."},
     {"role": "assistant", "content": "1, 2, 3, 4, 5."}],
    [{"role": "user", "content": "What is 1 + 1?"},
     {"role": "assistant", "content": "2."},
     {"role": "user", "content": "And times 3?"},
     {"role": "assistant", "content": "6."}],
)

CONVERSATIONS: tuple[list[dict[str, str]], ...] = tuple(
    [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for question, answer in _PAIRS) + _MORE
