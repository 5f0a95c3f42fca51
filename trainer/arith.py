"""The "arith-chain" task: multi-step arithmetic with a worked solution, one step per line.

A problem is a chain such as ``47+38-19+56``, evaluated left to right. Its worked solution
has one line per step, each starting from the previous result, then a final-answer line::

    47+38=85
    85-19=66
    66+56=122
    answer: 122

Rows follow DeepMath-103K's layout (``question``, ``final_answer``, ``difficulty``) plus
``solution`` (the text above: step lines and the final-answer line, no end-of-sequence token).

Splits. Which split a problem belongs to is a pure function of its question text
(`split_of`): a chain of more than `MAX_TRAIN_STEPS` steps is ``hard``; any other problem goes
to ``train`` (80%), ``validation`` (10%) or ``test`` (10%) by a SHA-256 hash of the question.
A seed only picks which problems of a split are drawn, so no seed can put a test problem
into training, and ``hard`` problems are longer than anything training sees.

Multiplication (operator ``*``, off by default) takes a one-digit factor 2-9, and the question
brackets everything before it (``(47+38)*3-19``) so that ordinary precedence gives the same
value as the left-to-right chain.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

TASK_NAME = "arith-chain"
SPLITS = ("train", "validation", "test", "hard")
MAX_TRAIN_STEPS = 5  # chains longer than this are the `hard` split, never trained on
OPERATORS = "+-*"
# The final-answer line is ANSWER_MARKER, one space, the integer: ``answer: 122``.
ANSWER_MARKER = "answer:"
# Every character a prompt, a solution or the chat template can produce (no other is needed).
ALPHABET = "0123456789+-*()=:QA answer\n"

# The prompt format, shared by training and evaluation: ``Q: <question>\nA:\n``; the model
# continues with the solution and ends with the tokenizer's EOS token.
PROMPT_TEMPLATE = "Q: {question}\nA:\n"
# The same format as a chat template: a user turn renders as the prompt's question part, an
# assistant turn as ``A:\n`` + content + EOS; system turns are ignored (the model has none).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}A:\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}A:\n{% endif %}"
)

_HASH_SALT = "arith-chain/v1:"
_SPLIT_CUTS = (("train", 80), ("validation", 90), ("test", 100))  # hash % 100 below the cut
_MAX_MISSES = 100_000
_STEP_RE = re.compile(r"([+\-*])(\d+)")


@dataclass(slots=True)
class ArithConfig:
    """Difficulty knobs of the generator."""

    min_steps: int = 2
    max_steps: int = 5
    digits: int = 2  # every +/- operand has exactly this many digits (1: 0-9)
    operators: str = "+-"  # a subset of "+-*"
    allow_negative: bool = False  # if False, a '-' step never takes the running value below 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, "
                             f"{self.max_steps}")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits must be in 1..6, got {self.digits}")
        if not self.operators or any(op not in OPERATORS for op in self.operators):
            raise ValueError(f"operators must be a non-empty subset of {OPERATORS!r}, "
                             f"got {self.operators!r}")
        if "*" in self.operators and not set(self.operators) & set("+-"):
            raise ValueError("operators needs '+' or '-' besides '*'")

    def check_split(self, split: str) -> None:
        """Raise ValueError if no problem of these step counts can belong to ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        if split == "hard" and self.min_steps <= MAX_TRAIN_STEPS:
            raise ValueError(f"the hard split has more than {MAX_TRAIN_STEPS} steps: set "
                             f"min_steps >= {MAX_TRAIN_STEPS + 1}")
        if split != "hard" and self.max_steps > MAX_TRAIN_STEPS:
            raise ValueError(f"split {split!r} has at most {MAX_TRAIN_STEPS} steps (longer "
                             f"chains are the hard split): set max_steps <= {MAX_TRAIN_STEPS}")


def default_config(split: str) -> ArithConfig:
    """The default knobs of a split: 2-5 steps, or 6-8 steps for ``hard``."""
    if split == "hard":
        return ArithConfig(min_steps=MAX_TRAIN_STEPS + 1, max_steps=MAX_TRAIN_STEPS + 3)
    return ArithConfig()


@dataclass(frozen=True, slots=True)
class ArithProblem:
    """One problem with its worked solution."""

    question: str
    step_lines: tuple[str, ...]  # "47+38=85", one per step
    answer: int

    @property
    def num_steps(self) -> int:
        return len(self.step_lines)

    @property
    def solution(self) -> str:
        return "\n".join(self.step_lines) + f"\n{ANSWER_MARKER} {self.answer}"

    def to_row(self) -> dict:
        """A DeepMath-103K-shaped row (plus ``solution``); difficulty = number of steps."""
        return {"question": self.question, "final_answer": str(self.answer),
                "difficulty": float(self.num_steps), "solution": self.solution}


def format_prompt(question: str) -> str:
    """The prompt the model sees for ``question`` (the chat template renders the same)."""
    return PROMPT_TEMPLATE.format(question=question)


def count_steps(question: str) -> int:
    """Number of steps (binary operators) in a chain question."""
    return sum(question.count(op) for op in OPERATORS)


def split_of(question: str) -> str:
    """The split ``question`` belongs to: by its length, then by a hash of its text."""
    if count_steps(question) > MAX_TRAIN_STEPS:
        return "hard"
    digest = hashlib.sha256((_HASH_SALT + question).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return next(name for name, cut in _SPLIT_CUTS if bucket < cut)


def solve(question: str) -> ArithProblem:
    """Worked solution of a chain question (as the generator writes them), left to right."""
    flat = question.replace("(", "").replace(")", "")
    head = re.match(r"\d+", flat)
    if head is None or _STEP_RE.sub("", flat[head.end():]):
        raise ValueError(f"not an arith-chain question: {question!r}")
    value = int(head.group())
    lines = []
    for op, operand_text in _STEP_RE.findall(flat[head.end():]):
        operand = int(operand_text)
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        lines.append(f"{value}{op}{operand}={result}")
        value = result
    if not lines:
        raise ValueError(f"not an arith-chain question (no step): {question!r}")
    return ArithProblem(question=question, step_lines=tuple(lines), answer=value)


def sample_problem(rng: random.Random, config: ArithConfig) -> ArithProblem:
    """Draw one problem from ``config``'s distribution (any split)."""
    low = 0 if config.digits == 1 else 10 ** (config.digits - 1)
    high = 10 ** config.digits - 1
    value = rng.randint(low, high)
    question = str(value)
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        op = rng.choice(config.operators)
        if op == "-" and not config.allow_negative and value < low:
            op = "+"  # nothing of `digits` digits can be subtracted without going negative
        if op == "*":
            operand = rng.randint(2, 9)
            question = f"({question})*{operand}" if set(question) & set("+-") else \
                f"{question}*{operand}"
            value *= operand
            continue
        top = high if op == "+" or config.allow_negative else min(high, value)
        operand = rng.randint(low, top)
        question += f"{op}{operand}"
        value = value + operand if op == "+" else value - operand
    return solve(question)


def iter_problems(split: str, seed: int, config: ArithConfig | None = None,
                  *, unique: bool = False) -> Iterator[ArithProblem]:
    """An endless stream of ``split``'s problems, drawn reproducibly from ``seed``.

    Problems of other splits are drawn and thrown away, so the stream holds only problems
    whose `split_of` is ``split``. With ``unique``, a question is never repeated (the caller
    must not ask for more problems than the split holds)."""
    config = config if config is not None else default_config(split)
    config.check_split(split)
    rng = random.Random(f"{TASK_NAME}:{split}:{seed}")
    seen: set[str] = set()
    num_misses = 0  # draws in a row that gave nothing new
    while True:
        problem = sample_problem(rng, config)
        if split_of(problem.question) != split or (unique and problem.question in seen):
            num_misses += 1
            if num_misses > _MAX_MISSES:
                raise ValueError(f"split {split!r} ran out of distinct problems for these "
                                 f"knobs after {len(seen)}; raise steps or digits")
            continue
        num_misses = 0
        if unique:
            seen.add(problem.question)
        yield problem


def generate_rows(split: str, num: int, seed: int,
                  config: ArithConfig | None = None) -> list[dict]:
    """``num`` distinct problems of ``split`` as DeepMath-shaped rows."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    stream = iter_problems(split, seed, config, unique=True)
    return [next(stream).to_row() for _ in range(num)]
