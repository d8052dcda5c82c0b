"""Constrained decoding to JSON: JSON mode (OpenAI's `response_format: {"type": "json_object"}`,
which DeepSeek's API offers too) and JSON Schema (`{"type": "json_schema", ...}`, OpenAI's
structured outputs).

`JsonState` is a byte-level pushdown automaton: an immutable state (a stack of frames, one per
open object, array, string, number or literal, each tied to its schema node) that `feed(bytes)`
advances, or answers None where the bytes cannot continue any valid document. JSON mode is the
schema `{"type": "object"}`: any object. A token is allowed when its bytes feed; once the document
is closed only an end-of-sentence token is. Bytes of 0x80 and above are allowed inside strings only
(UTF-8 continuation is not checked byte by byte; the tokenizer's text decides what they spell).

`compile_schema` reads a JSON Schema into `Node`s. Supported: `type` (a name or a list of names),
`properties`, `required`, `additionalProperties` (true, false or a schema; JSON Schema's default
is true), `items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`, `allOf` of one schema, `oneOf`
whose branches cannot both match (different types, or a discriminator: a required property with
different const values), `$ref` to `#`, `#/$defs/...` or `#/definitions/...` (recursion included),
and the annotations (`title`, `description`, ...): what pydantic writes. The top level must be an
object. Anything else (`pattern`, `minimum`, ...) is a `SchemaError` naming the keyword, rather
than a document that silently ignores it. Enum and const values must be written in their compact
form (`json.dumps(v, separators=(",", ":"))`); a key may appear once; keys are compared by name
(escapes decoded), and a listed name is written in its compact form.

An `anyOf` makes the automaton nondeterministic: `JsonState` holds every reading (`_Path`) of the
text that a branch still allows, and a byte is allowed while one reading survives. Overlapping
branches nested in each other multiply the readings (two branches that both stay open at each of
ten levels: 1,024), so at most `MAX_READINGS` (64) are kept, the first in branch order, like a
parser's ordered choice: every kept reading is a valid one, so the output still satisfies the
schema, but a document that only a dropped reading allowed can no longer be written. Nested
anyOf/oneOf are flattened at compile time into one list of distinct alternatives (at most
`MAX_BRANCHES`, 256), so that references to one definition from several branches are one reading,
not one per path through the nesting; a schema has at most `MAX_SCHEMA_SIZE` (20,000) subschemas
and enum values, and a key is looked up among the listed names by bisection, so no step's work
grows with a request's schema beyond these bounds.

`JsonConstraint` picks the next token for one row without scoring the whole vocabulary: greedy
rows take the most likely allowed token (candidates in order of likelihood), sampled rows draw from
the row's distribution and draw again without a refused token, which samples exactly from the
distribution restricted to the allowed tokens. Only when 64 candidates in a row are refused does
it check every token of the vocabulary. Runs of whitespace are cut at 32 bytes, so that a model
cannot fill max_tokens with blank lines inside the document.
"""

from __future__ import annotations

import bisect
import collections
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_LITERALS = {ord("t"): (b"rue", "boolean"), ord("f"): (b"alse", "boolean"), ord("n"): (b"ull", "null")}
_KINDS = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "$schema", "$id", "$comment",
                          "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "discriminator"})
MAX_WHITESPACE = 32  # bytes of whitespace in a row
MAX_CANDIDATES = 64  # refused candidates before every token is checked
MAX_READINGS = 64  # readings of the text kept alive at once (anyOf); see JsonState
MAX_BRANCHES = 256  # alternatives of one anyOf/oneOf, nested ones flattened into it
MAX_SCHEMA_SIZE = 20_000  # schema nodes plus enum/const values in one schema


class SchemaError(ValueError):
    """A JSON Schema this decoder cannot enforce (or an invalid one)."""


@dataclass(eq=False)
class Node:
    """One schema node, compiled. `properties` by name (UTF-8); `written`: each property's name as
    a key writes it (escaped, compact) -> the name; `additional`: the schema of keys outside
    `properties` (None: not allowed); `enum`: the compact serializations a value must equal (None:
    any); `any_of`: the branches a value may match instead of this node's own keywords."""

    kinds: frozenset = _KINDS
    properties: dict[bytes, Node] = field(default_factory=dict)
    written: dict[bytes, bytes] = field(default_factory=dict)
    required: frozenset = frozenset()
    additional: Node | None = None
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    enum: tuple[bytes, ...] | None = None
    any_of: tuple[Node, ...] | None = None
    keys: tuple[bytes, ...] = ()  # the written forms, sorted: keys by prefix (bisect)


def _any() -> Node:
    node = Node()
    node.additional = node.items = node
    return node


ANY = _any()
OBJECT = Node(kinds=frozenset({"object"}), additional=ANY, items=ANY)  # JSON mode


def compile_schema(schema: Any) -> Node:
    """A JSON Schema (a dict) as a `Node` tree; SchemaError for what is not supported. The trees of
    recent schemas are kept (a request's n choices and its retries share one): at most 64, and at
    most SCHEMA_CACHE_CHARS characters of schema text in all (see _SchemaCache)."""
    try:
        try:
            text = json.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError):  # not JSON: let the compiler say what is wrong
            return _compile(schema)
        return _schema_cache.get(text)
    except RecursionError:
        raise SchemaError("the schema nests too deeply") from None
    except SchemaError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:  # a shape no check above foresaw
        raise SchemaError(f"the schema cannot be read ({type(e).__name__}: {e})") from None


SCHEMA_CACHE_ENTRIES = 64
# A compiled tree takes ~20x its schema's JSON text (a 0.94 MB schema of 20,000 subschemas, the
# largest accepted, took ~20 MiB): counted by entries alone, 64 such schemas held 1.3 GiB that any
# client could fill. ~2 MB of text is ~40 MiB of trees; a larger schema is compiled and not kept.
SCHEMA_CACHE_CHARS = 2_000_000


class _SchemaCache:
    """Least-recently-used compiled schemas, bounded by count and by total text length; thread-safe
    (the server compiles in worker threads)."""

    def __init__(self) -> None:
        self._items: collections.OrderedDict[str, Node] = collections.OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, text: str) -> Node:
        with self._lock:
            node = self._items.get(text)
            if node is not None:
                self._items.move_to_end(text)
                return node
        node = _compile(json.loads(text))  # (outside the lock: a large schema must not block others)
        if len(text) <= SCHEMA_CACHE_CHARS:
            with self._lock:
                if text not in self._items:
                    self._items[text] = node
                    self._chars += len(text)
                while len(self._items) > SCHEMA_CACHE_ENTRIES or self._chars > SCHEMA_CACHE_CHARS:
                    old, _ = self._items.popitem(last=False)
                    self._chars -= len(old)
        return node

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._chars = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def chars(self) -> int:
        return self._chars


_schema_cache = _SchemaCache()


def _compile(schema: Any) -> Node:
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
    exclusive: list[tuple[Node, str]] = []  # oneOf nodes, whose branches must exclude each other
    size = [0]  # nodes and enum values built so far
    building: set[int] = set()  # (ids of) the reference nodes not filled in yet
    refs: dict[str, Node] = {"#": Node()}  # the root, filled at the end; "$ref": "#" recurses to it

    def resolve(ref: str, bare: frozenset) -> Node:
        if not isinstance(ref, str):
            raise SchemaError(f"$ref must be a string, got {ref!r}")
        if ref in bare:  # back to itself through $ref, anyOf and allOf alone: a value that never starts
            raise SchemaError(f"$ref {ref!r} refers to itself without an object or array in between")
        if ref in refs:
            return refs[ref]
        parts = ref.split("/")
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise SchemaError(f"$ref {ref!r}: only local references to #/$defs/NAME or #/definitions/NAME")
        defs = schema.get(parts[1], {})
        if not isinstance(defs, dict):
            raise SchemaError(f"$ref {ref!r}: the schema's {parts[1]} is not an object of definitions")
        target = defs.get(parts[2].replace("~1", "/").replace("~0", "~"))
        if target is None:
            raise SchemaError(f"$ref {ref!r} names no definition")
        node = refs[ref] = Node()  # filled below; a recursive reference finds it here
        return fill(node, target, ref, bare | {ref})

    def fill(node: Node, s: Any, where: str, bare: frozenset) -> Node:
        """Make the reference node `node` the schema `s`."""
        building.add(id(node))
        built = build(s, where, bare)
        building.discard(id(node))
        if id(built) in building:  # an alias of a definition still being built: refer to it, not a copy
            node.any_of = (built,)
        else:
            node.__dict__.update(built.__dict__)
        return node

    def build(s: Any, where: str, bare: frozenset = frozenset()) -> Node:
        """`bare`: the references entered since the last object or array (see resolve)."""
        if s is True or s == {}:
            return ANY
        enum = s.get("enum") if isinstance(s, dict) else None
        size[0] += 1 + (len(enum) if isinstance(enum, list) else 0)
        if size[0] > MAX_SCHEMA_SIZE:
            raise SchemaError(f"the schema is too large: more than {MAX_SCHEMA_SIZE:,} subschemas and enum values")
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object or true, got {s!r}")
        unknown = sorted(set(s) - _ANNOTATIONS - {"type", "properties", "required", "additionalProperties", "items",
                                                    "minItems", "maxItems", "enum", "const", "$ref", "anyOf", "allOf",
                                                    "oneOf"})
        if unknown:
            raise SchemaError(f"{where}: JSON Schema keyword {unknown[0]!r} is not supported by this server's "
                              "constrained decoding")
        for key in ("$ref", "anyOf", "allOf", "oneOf"):
            if key in s and set(s) - _ANNOTATIONS - {key}:
                raise SchemaError(f"{where}: {key} beside other keywords is not supported")
        if "$ref" in s:
            return resolve(s["$ref"], bare)
        if "allOf" in s:
            if not isinstance(s["allOf"], list) or len(s["allOf"]) != 1:
                raise SchemaError(f"{where}: allOf is supported with one schema only")
            return build(s["allOf"][0], f"{where}/allOf/0", bare)
        for key in ("anyOf", "oneOf"):
            if key not in s:
                continue
            if not isinstance(s[key], list) or not s[key]:
                raise SchemaError(f"{where}: {key} must be a non-empty list of schemas")
            branches = [build(b, f"{where}/{key}/{i}", bare) for i, b in enumerate(s[key])]
            node = Node(any_of=tuple(branches))
            if key == "oneOf":
                exclusive.append((node, where))  # checked once every $ref is filled in
            return ANY if key == "anyOf" and any(b is ANY for b in branches) else node
        node = Node()
        if "type" in s:
            names = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not names or not all(isinstance(t, str) and t in _KINDS for t in names):
                raise SchemaError(f"{where}: type must be one of {sorted(_KINDS)} or a list of them, got {s['type']!r}")
            node.kinds = frozenset(names)
        if "enum" in s or "const" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            try:
                node.enum = tuple(json.dumps(v, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
                                  for v in values if "type" not in s or _kind_of(v) & node.kinds)
            except ValueError as e:  # (a UnicodeEncodeError too)
                raise SchemaError(f"{where}: enum/const value that JSON cannot write: {e}") from None
            if not node.enum:
                raise SchemaError(f"{where}: no enum/const value has the schema's type")
        props = s.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(k, str) for k in props):
            raise SchemaError(f"{where}: properties must be an object (names are strings)")
        node.properties = {k.encode(): build(v, f"{where}/properties/{k}") for k, v in props.items()}
        node.written = {json.dumps(k, ensure_ascii=False)[1:-1].encode(): k.encode() for k in props}
        node.keys = tuple(sorted(node.written))
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}: required must be a list of names")
        node.required = frozenset(r.encode() for r in required)
        extra = s.get("additionalProperties", True)
        node.additional = None if extra is False else build(extra, f"{where}/additionalProperties")
        missing = node.required - set(node.properties)
        if missing and node.additional is None:
            raise SchemaError(f"{where}: required {sorted(missing)[0].decode()!r} is not among the properties")
        node.items = build(s.get("items", True), f"{where}/items")
        for key in ("minItems", "maxItems"):
            v = s.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise SchemaError(f"{where}: {key} must be an integer >= 0")
        node.min_items, node.max_items = s.get("minItems", 0), s.get("maxItems")
        if node.max_items is not None and node.min_items > node.max_items:
            raise SchemaError(f"{where}: minItems > maxItems")
        return node

    try:
        root = fill(refs["#"], schema, "#", frozenset({"#"}))
    except UnicodeEncodeError as e:
        raise SchemaError(f"a name in the schema is not valid Unicode text: {e.reason}") from None
    if root.kinds != frozenset({"object"}) or root.enum is not None or root.any_of is not None:
        raise SchemaError("the schema's top level must be {\"type\": \"object\", ...}")
    for node, where in exclusive:
        if not _exclusive(node.any_of):
            raise SchemaError(f"{where}: oneOf is supported where its branches cannot both match: different types, "
                              "or objects told apart by a required property with different const values (a "
                              "discriminator); anyOf takes any branches")
    _flatten_branches(root)
    return root


def _flatten_branches(root: Node) -> None:
    """Give every anyOf/oneOf node its alternatives as a flat list of distinct non-anyOf nodes, in
    branch order. Nested branches, and several references to one definition, would otherwise be
    expanded again at every byte that starts a value: twice per level for anyOf [$ref X, $ref X]
    nested 24 deep is 16 million readings of one byte."""
    flat: dict[int, tuple[Node, ...]] = {}

    def leaves(node: Node) -> tuple[Node, ...]:
        if node.any_of is None:
            return (node,)
        if id(node) not in flat:  # (no cycle: a reference back to itself through anyOf alone is refused)
            out = tuple({id(x): x for b in node.any_of for x in leaves(b)}.values())
            if len(out) > MAX_BRANCHES:
                raise SchemaError(f"an anyOf/oneOf has more than {MAX_BRANCHES} alternatives (nested ones counted)")
            flat[id(node)] = out
        return flat[id(node)]

    for node in [n for n in _reachable(root) if n.any_of is not None]:
        node.any_of = leaves(node)


def _reachable(root: Node) -> list[Node]:
    seen: dict[int, Node] = {}
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        todo += [*node.properties.values(), *(x for x in (node.additional, node.items) if x is not None),
                 *(node.any_of or ())]
    return list(seen.values())


def _exclusive(branches: tuple[Node, ...]) -> bool:
    """Can no value match two of these branches (as far as a simple check can tell)?"""
    if any(b.any_of is not None for b in branches):
        return False

    def kinds(b: Node) -> set[str]:
        return set(b.kinds) | ({"integer"} if "number" in b.kinds else set())  # an integer is a number

    if all(b.enum is None for b in branches):
        seen: set[str] = set()
        for b in branches:
            if kinds(b) & seen:
                break
            seen |= kinds(b)
        else:
            return True
    if any(b.kinds != frozenset({"object"}) or b.enum is not None for b in branches):
        return False
    for name in frozenset.intersection(*(b.required for b in branches)):
        tags = [b.properties.get(name) for b in branches]
        if any(t is None or t.enum is None for t in tags):
            continue
        values = [[(type(v) is bool, v) for v in map(json.loads, t.enum)] for t in tags]  # (1 == 1.0, not True)
        if all(not any(v in values[j] for v in values[i]) for i in range(len(values)) for j in range(i)):
            return True
    return False


# Frames (tuples, innermost last): ("value", node) a value is expected; ("obj", node, names used,
# phase: key_or_end | key | colon | value | after, the value's node between key and value);
# ("arr", node, items so far, phase: value_or_end | value | after); ("str", escape state);
# ("key", bytes so far, escape state) above its object; ("num", integer only, phase);
# ("lit", bytes left); ("enum", candidates, bytes matched).
# A _Path's steps answer a tuple of paths: none (the byte cannot follow), one, or several where an
# `anyOf` lets the same bytes mean more than one branch.

@dataclass(frozen=True)
class _Path:
    """One reading of the text so far: a stack of frames."""

    frames: tuple = (("value", OBJECT),)
    ws: int = 0
    done: bool = False

    # -- helpers ------------------------------------------------------------------------------
    def _set(self, *frames: tuple, drop: int = 1) -> tuple[_Path]:
        """Replace the innermost `drop` frames with `frames` (whitespace run reset)."""
        return (_Path(self.frames[:len(self.frames) - drop] + frames),)

    def _space(self) -> tuple[_Path, ...]:
        return (_Path(self.frames, self.ws + 1),) if self.ws < MAX_WHITESPACE else ()

    def _finish_value(self, drop: int = 1) -> _Path:
        """The innermost value is complete: its parent moves on (or the document is done)."""
        frames = self.frames[:len(self.frames) - drop]
        if not frames:
            return _Path((), 0, True)
        parent = frames[-1]
        if parent[0] == "obj":
            return _Path(frames[:-1] + (("obj", parent[1], parent[2], "after", None),))
        return _Path(frames[:-1] + (("arr", parent[1], parent[2] + 1, "after"),))  # an array

    def _value(self, node: Node, b: int) -> tuple[_Path, ...]:
        """The first byte of a value of `node`, replacing its "value" frame."""
        if node.any_of is not None:
            return tuple(p for branch in node.any_of for p in self._value(branch, b))
        if node.enum is not None:
            matches = tuple(c for c in node.enum if c[0] == b)
            if not matches:
                return ()
            return self._set(("enum", matches, 1)) if any(len(c) > 1 for c in matches) else (self._finish_value(),)
        k = node.kinds
        if b == ord("{") and "object" in k:
            return self._set(("obj", node, frozenset(), "key_or_end", None))
        if b == ord("[") and "array" in k:
            return self._set(("arr", node, 0, "value_or_end"))
        if b == ord('"') and "string" in k:
            return self._set(("str", ""))
        if (b == ord("-") or b in _DIGITS) and ("number" in k or "integer" in k):
            integer = "number" not in k
            return self._set(("num", integer, "minus" if b == ord("-") else ("zero" if b == ord("0") else "int")))
        if b in _LITERALS and _LITERALS[b][1] in k:
            return self._set(("lit", _LITERALS[b][0]))
        return ()

    def _close_ok(self, frame: tuple) -> bool:
        if frame[0] == "obj":
            return frame[1].required <= frame[2]
        node, count = frame[1], frame[2]
        return count >= node.min_items

    # -- one byte -----------------------------------------------------------------------------
    def step(self, b: int) -> tuple[_Path, ...]:
        if self.done:
            return ()
        top = self.frames[-1]
        kind = top[0]
        if kind == "value":
            return self._space() if b in _WS else self._value(top[1], b)
        if kind == "obj":
            return self._object(top, b)
        if kind == "arr":
            return self._array(top, b)
        if kind == "str":
            return self._string(top, b)
        if kind == "key":
            return self._key(top, b)
        if kind == "lit":
            if b != top[1][0]:
                return ()
            return self._set(("lit", top[1][1:])) if len(top[1]) > 1 else (self._finish_value(),)
        if kind == "enum":
            _, cands, pos = top
            longer = tuple(c for c in cands if len(c) > pos and c[pos] == b)
            if longer:
                if any(len(c) > pos + 1 for c in longer):
                    return self._set(("enum", longer, pos + 1))
                return (self._finish_value(),)
            # no candidate goes on with this byte: the value ended one byte ago if one is complete
            return self._finish_value().step(b) if any(len(c) == pos for c in cands) else ()
        return self._number(top, b)

    def _object(self, top: tuple, b: int) -> tuple[_Path, ...]:
        _, node, used, phase, pending = top
        if b in _WS:
            return self._space()
        more = node.additional is not None or len(used) < len(node.properties)  # (used: listed names only)
        if phase in ("key_or_end", "key"):
            if b == ord('"') and more:  # (no key left to write: only the closing brace)
                return (_Path(self.frames + (("key", b"", ""),)),)
            if phase == "key_or_end" and b == ord("}") and self._close_ok(top):
                return (self._finish_value(),)
            return ()
        if phase == "colon":
            return self._set(("obj", node, used, "value", None), ("value", pending)) if b == ord(":") else ()
        # after a member
        if b == ord(",") and more:
            return self._set(("obj", node, used, "key", None))
        if b == ord("}") and self._close_ok(top):
            return (self._finish_value(),)
        return ()

    def _key(self, top: tuple, b: int) -> tuple[_Path, ...]:
        _, buf, esc = top
        _, node, used, _, _ = self.frames[-2]
        if b == ord('"') and not esc:
            name = _key_name(buf)
            value = node.properties.get(name, node.additional)
            if name in used or value is None:
                return ()
            return self._set(("obj", node, used | {name}, "colon", value), drop=2)
        if esc:
            nxt = _escape(esc, b)
            if nxt is None:
                return ()
        elif b < 0x20:
            return ()
        else:
            nxt = "\\" if b == ord("\\") else ""
        grown = buf + bytes([b])
        if node.additional is None and not _unused_key(node, grown, used):
            return ()  # listed names only, each written in its one compact form
        return self._set(("key", grown, nxt))

    def _array(self, top: tuple, b: int) -> tuple[_Path, ...]:
        _, node, count, phase = top
        if b in _WS:
            return self._space()
        if phase in ("value_or_end", "value"):
            if phase == "value_or_end" and b == ord("]") and self._close_ok(top):
                return (self._finish_value(),)
            if node.max_items is not None and count >= node.max_items:
                return ()
            return _Path(self.frames + (("value", node.items),))._value(node.items, b)
        if b == ord(","):
            if node.max_items is not None and count >= node.max_items:
                return ()
            return self._set(("arr", node, count, "value"))
        if b == ord("]") and self._close_ok(top):
            return (self._finish_value(),)
        return ()

    def _string(self, top: tuple, b: int) -> tuple[_Path, ...]:
        esc = top[1]
        if esc:
            nxt = _escape(esc, b)
            return () if nxt is None else self._set(("str", nxt))
        if b == ord('"'):
            return (self._finish_value(),)
        if b == ord("\\"):
            return self._set(("str", "\\"))
        return () if b < 0x20 else ((self,) if self.ws == 0 else (_Path(self.frames),))

    def _number(self, top: tuple, b: int) -> tuple[_Path, ...]:
        _, integer, m = top
        digit = b in _DIGITS

        def go(phase: str) -> tuple[_Path]:
            return self._set(("num", integer, phase))

        if m == "minus":
            return go("zero" if b == ord("0") else "int") if digit else ()
        if m in ("zero", "int"):
            if digit and m == "int":
                return go("int")
            if not integer and b == ord("."):
                return go("dot")
            if not integer and b in b"eE":
                return go("exp")
        elif m == "dot":
            return go("frac") if digit else ()
        elif m == "frac":
            if digit:
                return go("frac")
            if b in b"eE":
                return go("exp")
        elif m == "exp":
            if b in b"+-":
                return go("exp_sign")
            return go("exp_digits") if digit else ()
        elif m == "exp_sign":
            return go("exp_digits") if digit else ()
        elif m == "exp_digits" and digit:
            return go("exp_digits")
        # the number has ended (it cannot end in minus, dot, exp or exp_sign): this byte follows it
        return self._finish_value().step(b) if m in ("zero", "int", "frac", "exp_digits") else ()


class JsonState:
    """Where a JSON document's text stands against its schema (default: any object): the readings
    of the text that are still possible (one, unless an `anyOf` keeps several branches open)."""

    __slots__ = ("paths",)

    def __init__(self, paths: tuple[_Path, ...] = (_Path(),)) -> None:
        self.paths = paths

    @classmethod
    def start(cls, schema: Node = OBJECT) -> JsonState:
        return cls((_Path((("value", schema),)),))

    @property
    def done(self) -> bool:
        return any(p.done for p in self.paths)

    def feed(self, data: bytes) -> JsonState | None:
        """The state after `data`, or None where the bytes cannot continue any valid document."""
        paths = self.paths
        for b in data:
            if len(paths) == 1:
                paths = paths[0].step(b)
                if len(paths) > MAX_READINGS:
                    paths = tuple(dict.fromkeys(paths))[:MAX_READINGS]
            else:  # (the same reading twice: once; past MAX_READINGS, the first ones, in branch order)
                kept: dict[_Path, None] = {}
                for p in paths:
                    kept.update(dict.fromkeys(p.step(b)))
                    if len(kept) >= MAX_READINGS:
                        break
                paths = tuple(kept)[:MAX_READINGS]
            if not paths:
                return None
        return JsonState(paths)


def _unused_key(node: Node, prefix: bytes, used: frozenset) -> bool:
    """Does a listed key not yet used begin with these written bytes? (Sorted keys: a bisection, not
    a scan of every name, at each byte of a key.)"""
    keys = node.keys
    i = bisect.bisect_left(keys, prefix)
    while i < len(keys) and keys[i].startswith(prefix):
        if node.written[keys[i]] not in used:
            return True
        i += 1
    return False


def _key_name(written: bytes) -> bytes:
    """A key's name (UTF-8) from the bytes written between its quotes, escapes decoded."""
    if b"\\" not in written:
        return written
    try:
        return json.loads(b'"' + written + b'"').encode("utf-8", "surrogatepass")
    except ValueError:  # not UTF-8 text: the raw bytes are the name
        return written


def _escape(esc: str, b: int) -> str | None:
    """The escape state after byte b inside a string's escape ("\\" or "uN": N hex digits left)."""
    if esc == "\\":
        if b not in _ESCAPES:
            return None
        return "u4" if b == ord("u") else ""
    if b not in _HEX:
        return None
    left = int(esc[1:]) - 1
    return f"u{left}" if left else ""


def _kind_of(v: Any) -> set[str]:
    """The JSON Schema types a value has."""
    if v is None:
        return {"null"}
    if isinstance(v, bool):
        return {"boolean"}
    if isinstance(v, int):
        return {"integer", "number"}
    if isinstance(v, float):
        return {"number"} | ({"integer"} if v.is_integer() else set())
    return {"string"} if isinstance(v, str) else ({"array"} if isinstance(v, list) else {"object"})


class TokenConstraint:
    """One row's constrained-decoding state: subclasses say which tokens are `allowed` next (and may
    list them, `candidates`) and `advance` on the chosen one; `choose` picks it."""

    def allowed(self, token: int) -> bool:
        raise NotImplementedError

    def advance(self, token: int) -> bool:
        """Record `token` if it is allowed; return whether it was (a refused one changes nothing)."""
        raise NotImplementedError

    def candidates(self) -> list[int] | None:
        """Allowed tokens to pick from where the row's own choice is refused, when they are few and
        known (a marker, the stop tokens; not necessarily every allowed token); None: search."""
        return None

    def mask(self, listed: list[int] | None, vocab_size: int, device: torch.device) -> torch.Tensor:
        """The tokens `choose` picks from once the likeliest ones are refused: the candidates
        (`listed`, from `candidates()`), or every allowed token, checked one by one (the slow path)."""
        if listed is not None:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            mask[[t for t in listed if 0 <= t < vocab_size]] = True
            return mask
        return torch.tensor([self.allowed(i) for i in range(vocab_size)], dtype=torch.bool, device=device)

    def choose(self, first: int, logits: torch.Tensor, probs: torch.Tensor | None,
               generator: torch.Generator | None) -> int:
        """The row's token: `first` if allowed. Else, for a greedy row (`probs` None) the allowed token
        with the highest processed logit; for a sampled one a new draw from `probs` [V] without the
        refused tokens. Raises ValueError when no token is allowed."""
        if self.allowed(first):
            return first
        listed = self.candidates()
        if listed is None:
            if probs is None:
                for t in logits.topk(min(MAX_CANDIDATES, logits.numel())).indices.tolist():
                    if self.allowed(t):
                        return t
            else:
                p = probs.clone()
                p[first] = 0
                for _ in range(MAX_CANDIDATES):
                    if not bool((p > 0).any()):
                        break
                    noise = torch.empty_like(p).exponential_(generator=generator)
                    t = int((p / noise).argmax())
                    if self.allowed(t):
                        return t
                    p[t] = 0
        mask = self.mask(listed, logits.numel(), logits.device)
        if not bool(mask.any()):
            raise ValueError("constrained decoding: no token of the vocabulary can continue the output")
        if probs is not None:
            p = probs.masked_fill(~mask, 0)
            if bool((p > 0).any()):
                noise = torch.empty_like(p).exponential_(generator=generator)
                return int((p / noise).argmax())
        # greedy, or every allowed token had probability 0 (cut by top-k/top-p): the likeliest allowed
        return int(logits.float().masked_fill(~mask, float("-inf")).argmax())


class EitherConstraint(TokenConstraint):
    """The output follows one of several constraints (JSON, or tool calls), whichever the tokens so
    far still allow: a token is allowed if one of them allows it, and the ones that do not drop out."""

    def __init__(self, options: Sequence[TokenConstraint]) -> None:
        self.options = list(options)

    def allowed(self, token: int) -> bool:
        return any(o.allowed(token) for o in self.options)

    def candidates(self) -> list[int] | None:
        listed = [o.candidates() for o in self.options]
        return None if any(x is None for x in listed) else sorted(set().union(*listed))

    def advance(self, token: int) -> bool:
        live = [o for o in self.options if o.advance(token)]
        self.options = live or self.options
        return bool(live)


class JsonConstraint(TokenConstraint):
    """A row held to one JSON object (that a schema accepts); `choose` picks its next token and
    `advance` records it."""

    def __init__(self, token_bytes: Sequence[bytes | None], eos_ids: set[int], schema: Node = OBJECT) -> None:
        self.token_bytes, self.eos_ids = token_bytes, eos_ids
        self.state = JsonState.start(schema)

    def allowed(self, token: int) -> bool:
        if self.state.done:
            return token in self.eos_ids
        data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        return bool(data) and self.state.feed(data) is not None

    def candidates(self) -> list[int] | None:
        return sorted(self.eos_ids) if self.state.done else None

    def advance(self, token: int) -> bool:
        if self.state.done:
            return token in self.eos_ids
        data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
        nxt = self.state.feed(data) if data else None
        if nxt is not None:
            self.state = nxt
        return nxt is not None
