"""Tasks with verifiable answers: generated arithmetic and Countdown, or a user's JSONL file.

Each task yields `Problem(question, answer, meta)` and scores a completion with `reward()`.
Generated tasks are seeded; the test split is a fixed, held-out set that never overlaps the
training problems (different seed stream and de-duplicated against it).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .verify import countdown_correct, extract_answer, has_r1_format, numbers_equal

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:"
)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class RewardConfig:
    correct: float = 1.0
    format: float = 0.1  # R1-Zero's format reward: <think>...</think> <answer>...</answer>
    require_format_for_correct: bool = False


class Task:
    name = "task"

    def problems(self, split: str, n: int) -> list[Problem]:
        raise NotImplementedError

    def is_correct(self, problem: Problem, completion: str) -> bool:
        raise NotImplementedError

    def reward(self, problem: Problem, completion: str, cfg: RewardConfig | None = None) -> float:
        cfg = cfg or RewardConfig()
        fmt = has_r1_format(completion)
        correct = self.is_correct(problem, completion) and (fmt or not cfg.require_format_for_correct)
        return cfg.correct * correct + cfg.format * fmt

    def prompt(self, problem: Problem) -> str:
        return R1_ZERO_TEMPLATE.format(question=problem.question)


def _split_seed(seed: int, split: str) -> int:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return seed * 1000 + (0 if split == "train" else 1)


class _Generated(Task):
    test_size = 200

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._test: list[Problem] | None = None

    def _make(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def problems(self, split: str, n: int) -> list[Problem]:
        rng = random.Random(_split_seed(self.seed, split))
        if split == "test":
            return [self._make(rng) for _ in range(n)]
        held_out = {p.question for p in self.problems("test", self.test_size)}
        out: list[Problem] = []
        while len(out) < n:
            p = self._make(rng)
            if p.question not in held_out:
                out.append(p)
        return out


class ArithmeticTask(_Generated):
    """`a op b` with multi-digit operands; the answer is the exact integer result."""

    name = "arithmetic"

    def __init__(self, seed: int = 0, digits: tuple[int, int] = (1, 3), ops: str = "+-*") -> None:
        super().__init__(seed)
        self.digits, self.ops = digits, ops

    def _make(self, rng: random.Random) -> Problem:
        def num() -> int:
            d = rng.randint(*self.digits)
            return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

        a, b, op = num(), num(), rng.choice(self.ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(f"What is {a} {op} {b}?", str(value), {"a": a, "b": b, "op": op})

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return numbers_equal(extract_answer(completion), problem.answer)


class CountdownTask(_Generated):
    """Reach the target with + - * / using each given number exactly once (TinyZero's task)."""

    name = "countdown"

    def __init__(self, seed: int = 0, n_numbers: tuple[int, int] = (3, 3), max_number: int = 20) -> None:
        super().__init__(seed)
        self.n_numbers, self.max_number = n_numbers, max_number

    def _make(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.n_numbers))]
            order = nums[:]
            rng.shuffle(order)
            expr, value = str(order[0]), order[0]
            for x in order[1:]:
                op = rng.choice("+-*")
                expr, value = f"({expr} {op} {x})", {"+": value + x, "-": value - x, "*": value * x}[op]
            if 0 < value <= 1000:
                q = f"Using the numbers {nums}, create an equation that equals {value}. You can use basic " \
                    f"arithmetic operations (+, -, *, /) and each number must be used exactly once"
                return Problem(q, expr, {"numbers": nums, "target": value})

    def is_correct(self, problem: Problem, completion: str) -> bool:
        return countdown_correct(extract_answer(completion), problem.meta["numbers"], problem.meta["target"])


class FileTask(Task):
    """A JSONL file of {"prompt", "answer"} (GSM8K's "... #### 42" answers accepted).

    Numeric answers are compared as numbers (1,000 == 1000.0), others as exact strings after
    stripping whitespace. The last 10% of lines (at least one) form the test split.
    """

    name = "file"

    def __init__(self, path: str | Path, test_fraction: float = 0.1) -> None:
        self.path = Path(path)
        rows = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read task file {self.path}: {e}") from e
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, answer = row["prompt"] if "prompt" in row else row["question"], str(row["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{self.path}:{i}: expected a JSON object with 'prompt' and 'answer' ({e})") from e
            if "####" in answer:
                answer = answer.rsplit("####", 1)[1]
            rows.append(Problem(str(prompt), answer.strip()))
        if len(rows) < 2:
            raise ConfigError(f"{self.path} holds {len(rows)} problem(s); need at least 2 (train and test)")
        n_test = max(1, int(len(rows) * test_fraction))
        self._splits = {"train": rows[:-n_test], "test": rows[-n_test:]}

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        rows = self._splits[split]
        return rows if n is None else [rows[i % len(rows)] for i in range(n)]

    def is_correct(self, problem: Problem, completion: str) -> bool:
        got = extract_answer(completion)
        if got is None:
            return False
        if re.fullmatch(r"\s*-?[0-9,]+(\.[0-9]+)?\s*", problem.answer):  # as numbers_equal parses them
            return numbers_equal(got, problem.answer)
        return got.strip() == problem.answer.strip()


def _task_options(spec: str) -> tuple[str, dict[str, str]]:
    """`arithmetic:digits=1-2,ops=+` -> ("arithmetic", {"digits": "1-2", "ops": "+"})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--task {spec!r}: options are key=value pairs separated by commas")
        opts[key.strip()] = value.strip()
    return name, opts


def _int_range(spec: str, key: str, value: str) -> tuple[int, int]:
    lo, _, hi = value.partition("-")
    try:
        out = (int(lo), int(hi or lo))
    except ValueError:
        raise ConfigError(f"--task {spec!r}: {key} must be N or N-M, got {value!r}") from None
    if not 1 <= out[0] <= out[1] <= 18:
        raise ConfigError(f"--task {spec!r}: {key} must satisfy 1 <= N <= M <= 18, got {value!r}")
    return out


def get_task(spec: str, seed: int = 0) -> Task:
    """A task from its command-line name: `arithmetic[:digits=1-3,ops=+-*]`,
    `countdown[:numbers=3-4,max=20]`, or a JSONL file."""
    if Path(spec).is_file():
        return FileTask(spec)
    name, opts = _task_options(spec)
    allowed = {"arithmetic": {"digits", "ops"}, "countdown": {"numbers", "max"}}
    if name not in allowed:
        raise ConfigError(f"--task {spec!r}: expected 'arithmetic', 'countdown' or a JSONL file")
    unknown = sorted(set(opts) - allowed[name])
    if unknown:
        raise ConfigError(f"--task {spec!r}: unknown option(s) {', '.join(unknown)}; "
                          f"{name} takes {', '.join(sorted(allowed[name]))}")
    if name == "arithmetic":
        ops = opts.get("ops", "+-*")
        if not ops or set(ops) - set("+-*"):
            raise ConfigError(f"--task {spec!r}: ops must be made of + - *, got {ops!r}")
        return ArithmeticTask(seed, digits=_int_range(spec, "digits", opts.get("digits", "1-3")), ops=ops)
    try:
        max_number = int(opts.get("max", "20"))
    except ValueError:
        raise ConfigError(f"--task {spec!r}: max must be an integer") from None
    if not 2 <= max_number <= 10_000:
        raise ConfigError(f"--task {spec!r}: max must be in [2, 10000], got {max_number}")
    return CountdownTask(seed, n_numbers=_int_range(spec, "numbers", opts.get("numbers", "3")), max_number=max_number)
