"""Forced tool calls (OpenAI's `tool_choice: "required"` or a named function): the output is held
to DeepSeek's tool-call markup, each call naming an offered function, with arguments that the
function's JSON Schema accepts.

The markup is what the model's chat template writes for an assistant's tool calls (`markup_of`
reads it off a rendered probe conversation):

    v3 (V3, R1):  <calls_begin><call_begin>function<sep>NAME\\n```json\\nARGS\\n```<call_end>...<calls_end>
    v3.1:         <calls_begin><call_begin>NAME<sep>ARGS<call_end>...<calls_end>

then the end of the turn. The markers are single special tokens. The text between two markers is
checked byte by byte, so any tokenization of it is allowed: NAME against the offered names, ARGS
with the JSON automaton of constraints.py. With `parallel`, another call may follow a call; a named
function is called once. Function names are 1-64 letters, digits, `_`, `.` or `-` (OpenAI's rule,
and `.`), so a name ends where the next character cannot continue one; a few spaces may precede it,
as the parser of the output (server/tools.py) strips them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from .constraints import OBJECT, JsonState, Node, SchemaError, TokenConstraint, compile_schema

MARKUPS = ("v3", "v3.1")
_MARKERS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)
_MARKER_TEXTS = tuple(m.encode() for m in _MARKERS)
_TAIL = max(map(len, _MARKER_TEXTS)) - 1
MAX_CALLS = 16  # calls in one forced turn
MAX_SPACES = 4  # spaces before a name (the parser strips them; some tokenizers start words with one), or
# whitespace between two calls
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PROBE = "nanoseek_probe"
_PROBE_ARGS = '{"q": 1}'
# the text between markers, as parts: ("lit", bytes) | ("name", None) | ("json", None)
_HEAD = {"v3": (("lit", b"function"),), "v3.1": (("name", None),)}
_BODY = {"v3": (("name", None), ("lit", b"\n```json\n"), ("json", None), ("lit", b"\n```")), "v3.1": (("json", None),)}


@dataclass(frozen=True)
class ToolCallRule:
    """What a forced turn may call: `functions` (name, its parameters' JSON Schema or None for any
    object), written in `markup`; `parallel`: more than one call. `optional`: the calls are one of
    two ways the answer may go, the other being the JSON output asked for beside them
    (`tool_choice: "auto"` with `response_format` JSON); a function whose parameters this decoder
    cannot enforce then takes any object instead of refusing the request."""

    functions: tuple[tuple[str, Any], ...]
    markup: str = "v3"
    parallel: bool = True
    optional: bool = False

    def compile(self) -> dict[bytes, Node]:
        """Each function's compiled parameters; SchemaError for a bad rule."""
        if self.markup not in MARKUPS:
            raise SchemaError(f"tool-call markup must be one of {MARKUPS}, got {self.markup!r}")
        if not self.functions:
            raise SchemaError("a forced tool call needs at least one function")
        out: dict[bytes, Node] = {}
        for name, params in self.functions:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise SchemaError(f"function name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
            if name.encode() in out:
                raise SchemaError(f"function name {name!r} appears twice among the tools")
            try:
                out[name.encode()] = OBJECT if params is None else compile_schema(params)
            except SchemaError as e:
                if not self.optional:
                    raise SchemaError(f"function {name!r} parameters: {e}") from None
                out[name.encode()] = OBJECT
        return out


def rule_for(tools: Sequence[dict], choice: Any, markup: str, parallel: bool = True) -> ToolCallRule | None:
    """The rule for OpenAI's `tool_choice` over `tools` (OpenAI function definitions): None for
    "auto" / "none" / None; all functions for "required"; one for {"type": "function", "function":
    {"name": ...}} (called once). ValueError for a choice that names no offered function."""
    if choice in (None, "auto", "none"):
        return None
    functions = [(t["function"]["name"], t["function"].get("parameters")) for t in tools]
    if choice == "required":
        return ToolCallRule(tuple(functions), markup, parallel)
    if not (isinstance(choice, dict) and choice.get("type", "function") == "function"
            and isinstance(choice.get("function"), dict)):
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or {{\"type\": \"function\", "
                         f"\"function\": {{\"name\": ...}}}}, got {choice!r}")
    name = choice["function"].get("name")
    chosen = [f for f in functions if f[0] == name]
    if not chosen:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
    return ToolCallRule((chosen[0],), markup, parallel=False)


def markup_of(render) -> str | None:
    """Which markup a chat template writes: `render(messages)` is the rendered text of a
    conversation (with special tokens; rendered with the request's tools, which select a named
    `tool_use` template as they would for the prompt) or raises when the template cannot write
    tool calls."""
    call = {"id": "call_0", "type": "function", "function": {"name": _PROBE, "arguments": _PROBE_ARGS}}
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    try:
        text = render(probe)
    except Exception:  # noqa: BLE001 - a template that cannot write tool calls has no markup
        return None
    if f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{_PROBE}\n```json\n{_PROBE_ARGS}\n```" in text:
        return "v3"
    if f"{TOOL_CALL_BEGIN}{_PROBE}{TOOL_SEP}{_PROBE_ARGS}" in text:
        return "v3.1"
    return None


class ToolCallConstraint(TokenConstraint):
    """One row held to forced tool calls. State: (phase, text state, name, calls so far); phases:
    open (expects <calls_begin>), call (<call_begin>), head and body (text, then <sep> / <call_end>),
    next (<call_begin> if parallel, or <calls_end>), end (a stop token), done."""

    def __init__(self, token_bytes: Sequence[bytes | None], eos_ids: set[int], markers: dict[str, int],
                 rule: ToolCallRule, schemas: dict[bytes, Node]) -> None:
        self.token_bytes, self.eos_ids, self.rule, self.schemas = token_bytes, eos_ids, rule, schemas
        self.ids = markers
        self.symbol = {i: m for m, i in markers.items()}
        self.names = tuple(schemas)
        self.head, self.body = _HEAD[rule.markup], _BODY[rule.markup]
        self.state: tuple = ("open", None, None, 0)  # text: (part, its state, name, the last bytes written)

    # -- the text between markers --------------------------------------------------------------
    def _initial(self, part: tuple, name: bytes | None):
        kind = part[0]
        return 0 if kind == "lit" else (b"" if kind == "name" else JsonState.start(self.schemas[name]))

    def _feed(self, parts: tuple, text: tuple, data: bytes) -> tuple | None:
        i, sub, name = text
        for b in data:
            while True:
                kind, lit = parts[i]
                if kind == "lit":
                    if sub < len(lit):
                        if lit[sub] != b:
                            return None
                        sub += 1
                        break
                elif kind == "name":
                    if b == 0x20 and sub.count(b" ") == len(sub) < MAX_SPACES:  # (a tokenizer's leading space)
                        sub += b" "
                        break
                    grown = sub.lstrip(b" ") + bytes([b])
                    if any(n.startswith(grown) for n in self.names):
                        sub += bytes([b])
                        break
                    if sub.lstrip(b" ") not in self.schemas:
                        return None
                    name = sub.lstrip(b" ")
                elif not sub.done:
                    sub = sub.feed(bytes([b]))
                    if sub is None:
                        return None
                    break
                i += 1  # part i is complete: the byte begins the next
                if i == len(parts):
                    return None
                sub = self._initial(parts[i], name)
        return i, sub, name

    def _complete(self, parts: tuple, text: tuple) -> bool:
        i, sub = text[0], text[1]
        if i != len(parts) - 1:
            return False
        kind, lit = parts[i]
        return sub == len(lit) if kind == "lit" else (sub.lstrip(b" ") in self.schemas if kind == "name" else sub.done)

    # -- tokens -----------------------------------------------------------------------------------
    def _next(self, token: int) -> tuple | None:
        phase, text, name, count = self.state
        if phase in ("end", "done"):  # (after the turn only stop tokens: ignore_eos rows too)
            return ("done", None, None, count) if token in self.eos_ids else None
        mark = self.symbol.get(token)
        if mark is None:
            data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
            if not data:
                return None
            if phase == "next":  # V3's template puts a newline between calls
                spaces = (text or 0) + len(data)
                return (phase, spaces, name, count) if spaces <= MAX_SPACES and not data.strip() else None
            if phase not in ("head", "body"):
                return None
            # a marker's characters inside a name or a JSON string would end the call early for a
            # reader of the text (the server's parser): refused
            seen = text[3] + data
            if any(m in seen for m in _MARKER_TEXTS):
                return None
            text = self._feed(self.head if phase == "head" else self.body, text[:3], data)
            return None if text is None else (phase, (*text, seen[-_TAIL:]), name, count)
        if phase == "open" and mark == TOOL_CALLS_BEGIN:
            return "call", None, None, count
        if mark == TOOL_CALL_BEGIN and (phase == "call" or (phase == "next" and self.rule.parallel
                                                             and count < MAX_CALLS)):
            return "head", (0, self._initial(self.head[0], None), None, b""), None, count
        if phase == "head" and mark == TOOL_SEP and self._complete(self.head, text):
            name = text[1].lstrip(b" ") if self.head[-1][0] == "name" else None
            return "body", (0, self._initial(self.body[0], name), name, b""), name, count
        if phase == "body" and mark == TOOL_CALL_END and self._complete(self.body, text):
            return "next", None, None, count + 1
        if phase == "next" and mark == TOOL_CALLS_END:
            return "end", None, None, count
        return None

    def allowed(self, token: int) -> bool:
        return self._next(token) is not None

    def candidates(self) -> list[int] | None:
        phase, text = self.state[:2]
        if phase in ("head", "body"):
            parts = self.head if phase == "head" else self.body
            if self._complete(parts, text) and not any(self._feed(parts, text[:3], bytes([b])) for b in range(256)):
                return [self.ids[TOOL_SEP if phase == "head" else TOOL_CALL_END]]  # only the marker can follow
            return None
        if phase in ("end", "done"):
            return sorted(self.eos_ids)
        return sorted(t for t in self.symbol if self._next(t) is not None)

    def advance(self, token: int) -> bool:
        nxt = self._next(token)
        if nxt is not None:
            self.state = nxt
        return nxt is not None

    @property
    def done(self) -> bool:
        return self.state[0] == "done"


def marker_ids(tokenizer) -> dict[str, int]:
    """The ids of the five tool-call markers; ValueError if the tokenizer lacks one."""
    out = {}
    for m in _MARKERS:
        i = tokenizer.token_to_id(m)
        if i is None:
            raise ValueError(f"the tokenizer has no {m} token, so it cannot write tool calls")
        out[m] = i
    return out
