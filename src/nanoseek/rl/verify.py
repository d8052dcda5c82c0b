"""Answer checkers that never run model output: a small parser, exact arithmetic, hard limits.

Model output is untrusted text. Nothing here calls `eval`, `exec` or `int()` on unbounded input:
numbers are limited in length, expressions in size and nesting, and arithmetic is exact
(`fractions.Fraction`), so huge numbers, division by zero and injection attempts score 0 safely.
Digits are ASCII 0-9 only: `str.isdigit` and `\\d` also accept superscripts and other scripts'
digits, some of which `int()` rejects ("²"), so any text a model writes scores, never raises.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

MAX_NUMBER_DIGITS = 40
MAX_EXPR_CHARS = 200
MAX_DEPTH = 16
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK_ANSWER_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


class ParseError(ValueError):
    pass


def extract_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> block, stripped; None when absent."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def has_r1_format(text: str) -> bool:
    """`<think> ... </think> <answer> ... </answer>` and nothing else around them."""
    return bool(_THINK_ANSWER_RE.match(text)) and text.count("<answer>") == 1 and text.count("<think>") == 1


def parse_number(text: str) -> Fraction:
    """An integer or decimal in ASCII digits (optionally negative, with , thousands separators), exactly."""
    s = text.strip().replace(",", "")
    if not re.fullmatch(r"-?[0-9]{1,%d}(\.[0-9]{1,%d})?" % (MAX_NUMBER_DIGITS, MAX_NUMBER_DIGITS), s):
        raise ParseError(f"not a number: {text[:40]!r}")
    return Fraction(s)


def numbers_equal(answer: str | None, expected: str | int | Fraction) -> bool:
    if answer is None:
        return False
    try:
        got = parse_number(answer)
        want = expected if isinstance(expected, Fraction) else parse_number(str(expected))
    except ParseError:
        return False
    return got == want


class _Parser:
    """Recursive descent over + - * / ( ) and non-negative integers; × ÷ − accepted as aliases."""

    def __init__(self, text: str) -> None:
        if len(text) > MAX_EXPR_CHARS:
            raise ParseError("expression too long")
        text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("x", "*")
        self.tokens = re.findall(r"[0-9]+|[-+*/()]|\S", text)
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end")
        self.pos += 1
        return tok

    def parse(self) -> Fraction:
        value = self.expr(0)
        if self.peek() is not None:
            raise ParseError(f"unexpected {self.peek()!r}")
        return value

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.atom(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.atom(depth)
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ParseError("division by zero")
                value = value / rhs
        return value

    def atom(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ParseError("nested too deeply")
        tok = self.take()
        if tok == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ParseError("missing )")
            return value
        if tok.isascii() and tok.isdigit():  # "²".isdigit() is True, but int("²") raises
            if len(tok) > MAX_NUMBER_DIGITS:
                raise ParseError("number too long")
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ParseError(f"unexpected {tok!r}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integers it used. Raises ParseError."""
    p = _Parser(text)
    return p.parse(), p.numbers


def countdown_correct(answer: str | None, numbers: list[int], target: int) -> bool:
    """The expression uses each given number exactly once (and no other) and equals the target."""
    if answer is None:
        return False
    expr = answer.split("=")[0]  # "1 + 2 = 3" is fine: judge the left side
    try:
        value, used = evaluate_expression(expr)
    except ParseError:
        return False
    return Counter(used) == Counter(numbers) and value == target
