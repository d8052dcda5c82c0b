"""JSON mode (`json_object=True`, the server's `response_format: {"type": "json_object"}`).

The byte automaton is checked against Python's `json` module (the oracle): every prefix of a
serialized object is accepted and the whole closes it; on random texts it accepts exactly what
`json.loads` parses as an object. The engine's constrained outputs parse with `json.loads`, batched
rows equal one-by-one rows, and the server answers through the `openai` client.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.engine import Engine, SamplingError
from nanoseek.engine.constraints import MAX_READINGS, MAX_WHITESPACE, JsonConstraint, JsonState, SchemaError, compile_schema

scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.text(max_size=8) | st.floats(
    allow_nan=False, allow_infinity=False)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=4), max_leaves=12)
objects = st.dictionaries(st.text(max_size=6), values, max_size=5)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(obj=objects, indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans(),
       separators=st.sampled_from([None, (",", ":"), (" , ", " : ")]))
def test_every_prefix_of_a_json_object_is_accepted(obj, indent, ascii_only, separators):
    data = json.dumps(obj, indent=indent, ensure_ascii=ascii_only, separators=separators).encode()
    state = JsonState()
    for i, b in enumerate(data):
        assert not state.done, data[:i]
        state = state.feed(bytes([b]))
        assert state is not None, (data[:i + 1], data)
    assert state.done and state.feed(b" ") is None and state.feed(b"{") is None


def _json_object(text: str) -> bool:
    def refuse(name):  # Python's json reads NaN and Infinity, which JSON does not have
        raise ValueError(name)

    try:
        return isinstance(json.loads(text, parse_constant=refuse), dict)
    except ValueError:
        return False


PIECES = ["{", "}", "[", "]", ",", ":", '"', "\\", "a", "é", "u", "00e9", "0", "1", "-", ".", "e", "+", "true", "tru",
          "null", "false", "NaN", " ", "\n", "\t", "\x01", '"k"', '"v"', "12", "-0.5e3"]


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=16))
def test_accepts_exactly_what_json_loads_parses_as_an_object(parts):
    text = "".join(parts)
    state = JsonState().feed(text.encode())
    accepted = state is not None and state.done
    # the automaton also refuses trailing whitespace (only an end-of-sentence token may follow) and
    # whitespace runs longer than MAX_WHITESPACE
    expected = _json_object(text) and text == text.rstrip(" \t\n\r") and not re.search(
        "[ \t\n\r]{%d}" % (MAX_WHITESPACE + 1), text)
    assert accepted == expected, text
    assert _live(_longest_accepted(JsonState(), text.encode())), text


def _live(state: JsonState) -> bool:
    """Not a dead end: a finished document, or a state that some byte continues."""
    return state.done or any(state.feed(bytes([b])) is not None for b in range(256))


def _longest_accepted(state: JsonState, data: bytes) -> JsonState:
    """The state after the longest prefix of `data` that the automaton accepts."""
    for i in range(len(data)):
        nxt = state.feed(data[i:i + 1])
        if nxt is None:
            break
        state = nxt
    return state


def test_choose_and_advance_on_a_hand_made_vocabulary():
    table = [b"{", b"}", b'"a"', b":", b"1", b"x", None, b" "]
    c = JsonConstraint(table, eos_ids={6})
    logits = torch.tensor([0.0, 5.0, 1.0, 0.0, 0.0, 9.0, 8.0, -1.0])
    assert c.choose(5, logits, None, None) == 0  # "x" and eos refused; "}" cannot open; "{" can
    c.advance(0)
    assert c.choose(5, logits, None, None) == 1  # now "}" closes it
    c.advance(1)
    assert c.state.done and c.choose(5, logits, None, None) == 6  # only the end-of-sentence token
    # sampled: draws again without the refused token, from the row's own distribution
    c = JsonConstraint(table, eos_ids={6})
    probs = torch.tensor([0.3, 0.0, 0.0, 0.0, 0.0, 0.4, 0.0, 0.3])
    picks = {c.choose(5, logits, probs, torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {0, 7}  # "{" or a leading space, never "x"
    with pytest.raises(ValueError, match="no token"):
        JsonConstraint([b"x"], eos_ids=set()).choose(0, torch.zeros(1), None, None)


# ---- JSON Schema ---------------------------------------------------------------------------------------

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", 3, None]}, "maxItems": 2},
                         "ok": {"type": ["boolean", "null"]}, "score": {"type": "number"},
                         "kind": {"const": "cat"}}}
TREE = {"type": "object", "$defs": {"node": {"type": "object", "additionalProperties": False,
                                             "properties": {"v": {"type": "integer"},
                                                            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                     "minItems": 1}},
                                             "required": ["v"]}},
        "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"], "additionalProperties": False}
LOOSE = {"type": "object", "properties": {"id": {"type": "integer"}}, "additionalProperties": {"type": "string"}}
# anyOf with overlapping branches (a cat with lives is the first, a cat without them the second),
# Optional fields as pydantic writes them, recursion to the root, a name that needs escapes
UNION = {"type": "object", "additionalProperties": False, "required": ["pet"], "properties": {
    "pet": {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["kind", "lives"],
         "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}}},
        {"type": "object", "additionalProperties": False, "required": ["kind"],
         "properties": {"kind": {"enum": ["dog", "cat"]}, "good": {"type": "boolean"}}}]},
    "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "Age"},
    "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
    'say "hi"\\': {"allOf": [{"type": "string"}], "description": "escaped name"}}}
SCHEMAS = {"person": PERSON, "tree": TREE, "loose": LOOSE, "union": UNION}


def _defs(schema: dict) -> dict:
    return {**schema.get("$defs", {}), "#": schema}


def _instances(node: dict, defs: dict, depth: int = 0):
    """A hypothesis strategy for values the schema accepts (the subset these schemas use)."""
    if "$ref" in node:
        return _instances(defs[node["$ref"].split("/")[-1]], defs, depth + 1)
    if "anyOf" in node:
        return st.one_of([_instances(b, defs, depth) for b in node["anyOf"]])
    if "allOf" in node:
        return _instances(node["allOf"][0], defs, depth)
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
    options = []
    for kind in kinds:
        if kind == "object":
            props = node.get("properties", {})
            req = set(node.get("required", []))
            extra = node.get("additionalProperties", True)
            fixed = st.fixed_dictionaries({k: _instances(v, defs, depth) for k, v in props.items() if k in req},
                                          optional={k: _instances(v, defs, depth) for k, v in props.items()
                                                    if k not in req and (depth < 2 or k not in ("kids", "next", "friend"))})
            if isinstance(extra, dict):
                more = st.dictionaries(st.text("xyz", min_size=1, max_size=3), _instances(extra, defs, depth), max_size=2)
                fixed = st.tuples(fixed, more).map(lambda t: {**t[1], **t[0]})
            options.append(fixed)
        elif kind == "array":
            options.append(st.lists(_instances(node["items"], defs, depth + 1), min_size=node.get("minItems", 0),
                                    max_size=node.get("maxItems", 3)))
        else:
            options.append({"string": st.text(max_size=6), "integer": st.integers(-10**6, 10**6),
                            "number": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-99, 99),
                            "boolean": st.booleans(), "null": st.none()}[kind])
    return st.one_of(options)


@pytest.mark.parametrize("name", list(SCHEMAS))
@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data(), indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_every_prefix_of_a_valid_instance_is_accepted(name, data, indent, ascii_only):
    schema = SCHEMAS[name]
    doc = data.draw(_instances(schema, _defs(schema)))
    jsonschema.validate(doc, schema)  # (the strategy's own check)
    text = json.dumps(doc, indent=indent, ensure_ascii=ascii_only).encode()
    state = JsonState.start(compile_schema(schema))
    for i in range(len(text)):
        state = state.feed(text[i:i + 1])
        assert state is not None, (text[:i + 1], text)
    assert state.done


def _valid(text: str, schema: dict) -> bool:
    """The oracle: JSON (no NaN, no repeated key) that jsonschema accepts, with no trailing whitespace
    or whitespace run longer than the automaton allows."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise ValueError("repeated key")
        return dict(items)

    def refuse(name):
        raise ValueError(name)

    try:
        doc = json.loads(text, object_pairs_hook=pairs, parse_constant=refuse)
    except ValueError:
        return False
    return (jsonschema.Draft202012Validator(schema).is_valid(doc) and text == text.rstrip(" \t\n\r")
            and not re.search("[ \t\n\r]{%d}" % (MAX_WHITESPACE + 1), text))


SCHEMA_PIECES = {
    "person": ['{', '}', '[', ']', ',', ':', '"name"', '"age"', '"tags"', '"ok"', '"score"', '"kind"', '"cat"', '"dog"',
               '"red"', '"green"', '"x"', '3', '12', '-1', '2.5', '1e3', 'true', 'null', ' ', '"'],
    "tree": ['{', '}', '[', ']', ',', ':', '"root"', '"v"', '"kids"', '"w"', '1', '-2', '0.5', 'null', ' '],
    "loose": ['{', '}', ',', ':', '"id"', '"x"', '"y"', '"s"', '1', '2.5', 'true', ' ', '"', '"\\u0069d"', '"\\u0078"'],
    "union": ['{', '}', ',', ':', '"pet"', '"kind"', '"cat"', '"dog"', '"lives"', '"good"', '"age"', '"next"',
              '"say \\"hi\\"\\\\"', '"hi"', '1', 'true', 'null', ' ', '{"kind":"cat"', '"pet":{"kind":"dog"}'],
}


@pytest.mark.parametrize("name", list(SCHEMAS))
@settings(max_examples=600, deadline=None, derandomize=True)
@given(data=st.data())
def test_accepts_exactly_what_the_schema_accepts(name, data):
    """Enum and const values are written compactly here, as the automaton requires."""
    parts = data.draw(st.lists(st.sampled_from(SCHEMA_PIECES[name]), max_size=18))
    text = "".join(parts)
    start = JsonState.start(compile_schema(SCHEMAS[name]))
    state = start.feed(text.encode())
    assert (state is not None and state.done) == _valid(text, SCHEMAS[name]), text
    assert _live(_longest_accepted(start, text.encode())), text  # no dead end on the way


KEYS = ["name", "age", "tags", "ok", "score", "kind", "root", "v", "kids", "id", "x", "pet", "lives", "good", "next",
        'say "hi"\\']
near = st.recursive(
    st.sampled_from(["red", "green", "cat", "dog", "", 3, 12, -1, 2.5, 0, True, False, None, {"kind": "cat"},
                     {"kind": "dog", "good": True}, {"kind": "cat", "lives": 9}]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=10)


@pytest.mark.parametrize("name", list(SCHEMAS))
@settings(max_examples=1500, deadline=None, derandomize=True)
@given(doc=st.dictionaries(st.sampled_from(KEYS), near, max_size=5), indent=st.sampled_from([None, 1]))
def test_well_formed_documents_are_accepted_exactly_when_valid(name, doc, indent):
    """Well-formed JSON near the schemas (their keys, enum values, wrong types, missing and extra
    members, long arrays): the automaton must agree with jsonschema on every one."""
    text = json.dumps(doc, indent=indent)
    state = JsonState.start(compile_schema(SCHEMAS[name])).feed(text.encode())
    assert (state is not None and state.done) == _valid(text, SCHEMAS[name]), text


def _paths(doc, at=()):
    """Every place in a document: (path, value) for the document and each member and item."""
    yield at, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, at + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, at + (i,))


def _mutated(doc, path, op, value):
    """A copy of doc with one change at path: a member dropped, a member added, a value replaced,
    an item appended."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    target = parent[path[-1]] if path else doc
    if op == "replace" and path:
        parent[path[-1]] = value
    elif op == "drop" and isinstance(target, dict) and target:
        target.pop(sorted(target)[0])
    elif op == "add" and isinstance(target, dict):
        target[value if isinstance(value, str) and value else "x"] = value
    elif op == "append" and isinstance(target, list):
        target.append(value)
    return doc


@pytest.mark.parametrize("name", list(SCHEMAS))
@settings(max_examples=600, deadline=None, derandomize=True)
@given(data=st.data())
def test_one_change_to_a_valid_instance_is_judged_as_jsonschema_judges_it(name, data):
    """Valid instances with one change (often just invalid: a required member gone, an unknown
    member, a value of the wrong type or outside the enum, one item too many)."""
    schema = SCHEMAS[name]
    doc = data.draw(_instances(schema, _defs(schema)))
    path = data.draw(st.sampled_from([p for p, _ in _paths(doc)]))
    changed = _mutated(doc, path, data.draw(st.sampled_from(["replace", "drop", "add", "append"])), data.draw(near))
    text = json.dumps(changed)
    state = JsonState.start(compile_schema(schema)).feed(text.encode())
    assert (state is not None and state.done) == _valid(text, schema), text


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_walks_never_dead_end_and_finish_valid(name):
    """Every step a random allowed byte (closing bytes weigh more, so that walks end): the walk never
    reaches a state that no byte continues, and a finished walk is a document jsonschema accepts."""
    table = [bytes([b]) for b in range(128)] + [None]
    closing = set(b'"}]0123456789,:')
    ended = 0
    for seed in range(30):
        rng, c, out = random.Random(seed), JsonConstraint(table, {128}, compile_schema(SCHEMAS[name])), b""
        for _ in range(300):
            allowed = [t for t in range(len(table)) if c.allowed(t)]
            assert allowed, out
            t = rng.choices(allowed, [40 if t in closing else 1 for t in allowed])[0]
            if t == 128:
                ended += 1
                doc = json.loads(out)  # (the oracle: valid JSON, no repeated key below)
                jsonschema.validate(doc, SCHEMAS[name])
                assert _valid(out.decode(), SCHEMAS[name]), out
                break
            c.advance(t)
            out += table[t]
    assert ended >= 10


def test_repeated_keys_and_a_comma_past_max_items_are_refused_at_once():
    person = compile_schema(PERSON)
    assert JsonState.start(person).feed(b'{"name":"a","name"') is None
    assert JsonState.start(compile_schema({"type": "object"})).feed(b'{"a":1,"a"') is None
    # a third tag could never be written: the comma before it is refused, not the tag after it
    assert JsonState.start(person).feed(b'{"tags":["red",3') is not None
    assert JsonState.start(person).feed(b'{"tags":["red",3,') is None


def _doubling(levels: int, distinct: bool) -> dict:
    """anyOf nested `levels` deep, each level two references to the one below (or, `distinct`, to
    the two below): a linear schema whose branch tree has 2**levels leaves."""
    defs = {"a0": {"type": "string"}, "b0": {"type": "integer"}}
    for i in range(1, levels + 1):
        defs[f"a{i}"] = {"anyOf": [{"$ref": f"#/$defs/a{i - 1}"}, {"$ref": f"#/$defs/{'b' if distinct else 'a'}{i - 1}"}]}
        defs[f"b{i}"] = {"anyOf": [{"$ref": f"#/$defs/b{i - 1}"}, {"$ref": f"#/$defs/a{i - 1}"}]}
    return {"type": "object", "$defs": defs, "properties": {"x": {"$ref": f"#/$defs/a{levels}"}}, "required": ["x"],
            "additionalProperties": False}


def test_nested_anyof_is_flattened_not_expanded_at_every_byte():
    # 2 KB of schema used to hold the model thread for minutes and gigabytes (2**levels readings)
    for distinct in (False, True):
        node = compile_schema(_doubling(40, distinct))
        state = JsonState.start(node).feed(b'{"x":"')
        assert state is not None and len(state.paths) == 1
        assert JsonState.start(node).feed(b'{"x":"ok"}').done
        assert (JsonState.start(node).feed(b'{"x":12}') is not None) == distinct  # b0: an integer
    # objects nested in overlapping branches still multiply the readings; at most MAX_READINGS live
    node = compile_schema({"type": "object", "$defs": {"n": {"anyOf": [
        {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}},
        {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}, "d": {"type": "integer"}}}]}},
        "properties": {"x": {"$ref": "#/$defs/n"}}})
    state = JsonState.start(node).feed(b'{"x":' + b'{"c":' * 30)
    assert state is not None and len(state.paths) <= MAX_READINGS
    assert state.feed(b'{"d":1}' + b"}" * 31).done


def test_the_compiled_schema_cache_is_bounded_by_text_as_well_as_count():
    """Clients choose the schemas: 64 of the largest accepted ones (20,000 subschemas each) once
    held 1.3 GiB of compiled trees. The cache keeps at most SCHEMA_CACHE_CHARS of schema text."""
    from nanoseek.engine import constraints as C

    C._schema_cache.clear()

    def big(tag: int, n: int, pad: int = 0) -> dict:
        return {"type": "object", "properties": {f"k{tag}_{i}" + "x" * pad: {"type": "integer"} for i in range(n)}}

    small = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert compile_schema(small) is compile_schema(dict(small))  # a request's choices share one tree
    n = 6000  # ~0.2 MB of text each
    for tag in range(30):
        compile_schema(big(tag, n))
    assert C._schema_cache.chars <= C.SCHEMA_CACHE_CHARS and 5 <= len(C._schema_cache) < 30
    huge = big(99, 19_000, pad=100)  # larger than the whole budget: compiled, not kept
    assert compile_schema(huge) is not compile_schema(huge)
    assert C._schema_cache.chars <= C.SCHEMA_CACHE_CHARS
    for tag in range(100):  # and by count
        compile_schema({"type": "object", "properties": {f"p{tag}": {"type": "null"}}})
    assert len(C._schema_cache) == C.SCHEMA_CACHE_ENTRIES


def test_keys_are_found_by_prefix_among_many():
    names = [f"k{i}" for i in range(5000)] + ["a", "ab", "abc"]
    node = compile_schema({"type": "object", "properties": {n: {"type": "null"} for n in names},
                           "additionalProperties": False})
    start = JsonState.start(node)
    assert start.feed(b'{"k4999":null,"ab":null,"a') is not None  # "a" and "abc" are left
    assert start.feed(b'{"a":null,"ab":null,"abc') is not None and start.feed(b'{"a":null,"ab":null,"ab"') is None
    assert start.feed(b'{"k5000') is None and start.feed(b'{"k50') is not None


@pytest.mark.parametrize("schema,match", [
    ({"type": "object", "properties": {f"p{i}": {"type": "null"} for i in range(20_001)}}, "schema is too large"),
    ({"type": "object", "properties": {"a": {"enum": list(range(20_001))}}}, "schema is too large"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"const": i} for i in range(200)] + [
        {"anyOf": [{"const": -i} for i in range(1, 100)]}]}}}, "more than 256 alternatives"),
    ({"type": "array"}, "top level must be"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}, "'pattern' is not supported"),
    ({"type": "object", "anyOf": [{}]}, "anyOf beside other keywords"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}},
     "oneOf is supported where its branches cannot both match"),
    ({"type": "object", "properties": {"a": {"oneOf": [  # a discriminator, but not required
        {"type": "object", "properties": {"k": {"const": "x"}}},
        {"type": "object", "properties": {"k": {"const": "y"}}, "required": ["k"]}]}}}, "cannot both match"),
    ({"type": "object", "properties": {"a": {"oneOf": [  # 1 and 1.0 are the same number
        {"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]},
        {"type": "object", "properties": {"k": {"enum": [2, 1.0]}}, "required": ["k"]}]}}}, "cannot both match"),
    ({"type": "object", "properties": {"a": {"allOf": [{}, {}]}}}, "allOf is supported with one schema only"),
    ({"type": "object", "properties": {"a": {"anyOf": []}}}, "anyOf must be a non-empty list"),
    ({"$ref": "#"}, "refers to itself"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}},
      "$defs": {"b": {"$ref": "#/$defs/c"}, "c": {"anyOf": [{"type": "null"}, {"allOf": [{"$ref": "#/$defs/b"}]}]}}},
     "refers to itself"),
    ({"type": "object", "properties": {"a": {"$ref": 3}}}, "must be a string"),
    ({"type": "object", "$defs": [1], "properties": {"a": {"$ref": "#/$defs/0"}}}, "not an object of definitions"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "names no definition"),
    ({"type": "object", "properties": {"a": {"$ref": "https://x/y"}}}, "only local references"),
    ({"type": "object", "required": ["b"], "additionalProperties": False}, "required 'b' is not among"),
    ({"type": "objet"}, "type must be one of"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "enum must be a non-empty list"),
    ([1], "must be an object"),
])
def test_unsupported_or_invalid_schemas_are_clear_errors(schema, match):
    with pytest.raises(SchemaError, match=match):
        compile_schema(schema)


# ---- the engine --------------------------------------------------------------------------------------

from test_server_support import random_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(str(random_model_dir(tmp_path_factory.mktemp("json"))), seed=0)


def _closing_bias(engine) -> dict[int, float]:
    """A nudge toward '}' so that a random model closes its object within a test's token budget."""
    return {i: 3.0 for i, b in enumerate(engine.tokenizer.token_bytes()) if b and b"}" in b}


def test_outputs_are_json_objects(engine):
    bias = _closing_bias(engine)
    results = [engine.generate("Give me JSON:", max_tokens=64, temperature=t, seed=s, json_object=True, logit_bias=bias)
               for t, s in [(0, None), *((1.0, s) for s in range(6)), (0.7, 9)]]
    finished = [r for r in results if r.finish_reason == "stop"]
    assert len(finished) >= 4
    for r in finished:
        assert _json_object(r.text), r.text
    # unconstrained, the same model writes no JSON at all
    free = engine.generate("Give me JSON:", max_tokens=16, temperature=0, ignore_eos=True)
    assert not _json_object(free.text) and JsonState().feed(free.text.encode()) is None


def test_batched_rows_equal_one_by_one_and_free_rows_stay_free(engine):
    bias = _closing_bias(engine)
    prompts = ["a", "b c d", "JSON please"]
    kw = [dict(json_object=True, logit_bias=bias, seed=1, temperature=1.0), dict(temperature=0),
          dict(json_object=True, temperature=0, logit_bias=bias)]
    from nanoseek.engine import SamplingParams
    params = [SamplingParams(max_tokens=24, **k) for k in kw]
    batched = engine.generate(prompts, params)
    for p, sp, r in zip(prompts, params, batched):
        assert engine.generate(p, sp).token_ids == r.token_ids
    assert batched[1].token_ids == engine.generate("b c d", max_tokens=24, temperature=0).token_ids


def test_json_mode_refuses_speculation_and_tokenizer_less_models(engine):
    with pytest.raises(SamplingError, match="does not combine with speculative"):
        engine.generate("x", max_tokens=4, json_object=True, speculative=1)
    bare = Engine(engine.model)
    with pytest.raises(SamplingError, match="needs the model's tokenizer"):
        bare.generate([1, 2], max_tokens=4, json_object=True)
    with pytest.raises(SamplingError, match="json_object must be True or False"):
        engine.generate("x", json_object="yes")


def test_scheduler_carries_the_json_state_across_joins(engine):
    """Rows that join a running batch keep their automaton state (the processor is rebuilt)."""
    from nanoseek.engine.scheduler import Scheduler

    bias = _closing_bias(engine)
    sched = Scheduler(engine, max_batch=4)
    kw = dict(max_tokens=24, temperature=0, json_object=True, logit_bias=bias)
    seqs = [sched.make_sequence(i, p, **kw) for i, p in enumerate(["first", "second one", "third"])]
    sched.add(0, sequence=seqs[0])
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    steps = 0
    while sched.has_work:
        for u in sched.step():
            got[u.seq_id] += u.token_ids
        steps += 1
        if steps in (2, 4):  # joins while the first row is mid-object
            sched.add(steps // 2, sequence=seqs[steps // 2])
    for i, p in enumerate(["first", "second one", "third"]):
        assert got[i] == engine.generate(p, **kw).token_ids
    with pytest.raises(SamplingError, match="does not combine with speculative"):
        Scheduler(engine, max_batch=2, speculative=1).make_sequence(9, "x", json_object=True)


def test_schema_outputs_validate(engine):
    tb = engine.tokenizer.token_bytes()
    bias = {i: 3.0 for i, b in enumerate(tb) if b and (b"}" in b or b'"' in b)}
    bias |= {i: -5.0 for i, b in enumerate(tb) if b and not b.strip()}  # fewer blank runs
    finished = 0
    for seed in range(8):
        r = engine.generate("Give JSON", max_tokens=128, temperature=1.0, seed=seed, json_schema=PERSON,
                            logit_bias=bias)
        if r.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(r.text), PERSON)
    assert finished >= 3
    with pytest.raises(SamplingError, match="json_schema: .*'pattern' is not supported"):
        engine.generate("x", json_schema={"type": "object", "properties": {"a": {"pattern": "x"}}})
    with pytest.raises(SamplingError, match="exclude each other"):
        engine.generate("x", json_schema=PERSON, json_object=True)


pydantic = pytest.importorskip("pydantic")


def _pydantic_models():
    """Models as users write them: Optional fields, an enum, a list of a union, self-reference."""
    from enum import Enum
    from typing import Literal, Optional, Union

    class Color(str, Enum):
        red = "red"
        green = "green"

    class Cat(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        kind: Literal["cat"]
        lives: int = 9

    class Dog(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        kind: Literal["dog"]
        good: bool

    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str = pydantic.Field(description="full name")
        age: Optional[int] = None
        color: Color
        pets: list[Union[Cat, Dog]] = []
        friend: Optional["Person"] = None

    class Shelter(pydantic.BaseModel):  # a discriminated union: pydantic writes oneOf
        model_config = pydantic.ConfigDict(extra="forbid")
        pet: Union[Cat, Dog] = pydantic.Field(discriminator="kind")

    return Person, Shelter


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_pydantic_schemas_compile_and_their_instances_are_accepted(data):
    """pydantic's own JSON Schema (anyOf for Optional and Union, $defs, a $ref at the top) compiles,
    and every prefix of what pydantic writes for a valid instance is accepted."""
    Person, _ = _pydantic_models()
    schema = Person.model_json_schema()
    doc = data.draw(_instances(schema, _defs(schema)))
    text = Person.model_validate(doc).model_dump_json(exclude_unset=True).encode()  # pydantic is the writer
    state = JsonState.start(compile_schema(schema))
    for i in range(len(text)):
        state = state.feed(text[i:i + 1])
        assert state is not None, (text[:i + 1], text)
    assert state.done


def test_pydantic_constrained_outputs_validate(engine):
    Person, Shelter = _pydantic_models()
    tb = engine.tokenizer.token_bytes()
    bias = {i: 3.0 for i, b in enumerate(tb) if b and (b"}" in b or b'"' in b or b"null" in b)}
    bias |= {i: -5.0 for i, b in enumerate(tb) if b and not b.strip()}
    finished = 0
    for seed in range(6):
        r = engine.generate("Give JSON", max_tokens=128, temperature=1.0, seed=seed,
                            json_schema=Person.model_json_schema(), logit_bias=bias)
        if r.finish_reason == "stop":
            finished += 1
            Person.model_validate_json(r.text)  # the oracle: raises on an invalid document
    assert finished >= 2
    # a discriminated union is oneOf, held exclusive by its required "kind" consts
    r = engine.generate("Give JSON", max_tokens=64, temperature=0, json_schema=Shelter.model_json_schema(),
                        logit_bias=bias)
    assert r.finish_reason == "stop"
    Shelter.model_validate_json(r.text)


def test_constrained_rows_report_the_models_own_logprobs(engine):
    """Logprobs are the raw model's, as for any row (vLLM's convention): the forced tokens' too,
    whose logprob under the model is below the argmax's; scoring the output as a prompt agrees."""
    prompt = engine.encode("x")
    r = engine.generate(prompt, max_tokens=12, temperature=0, json_object=True, logprobs=1,
                        logit_bias=_closing_bias(engine))
    _, scored, _ = engine.prompt_logprobs(prompt + r.token_ids)
    assert r.logprobs == pytest.approx(scored[len(prompt):], abs=1e-4)
    assert all(math.isfinite(lp) for lp in r.logprobs)
    forced = [i for i, (t, top) in enumerate(zip(r.token_ids, r.top_logprobs)) if t not in top]
    assert forced  # (the constraint overrode the model somewhere: not a vacuous check)


# ---- the server ----------------------------------------------------------------------------------------

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_server_support import LiveServer, assert_error_schema  # noqa: E402


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    s = LiveServer(engine.model_dir, "--max-model-len", "256", log_dir=tmp_path_factory.mktemp("logs"), name="json")
    yield s
    s.stop()


def test_response_format_json_object(server, engine):
    bias = {str(k): v for k, v in _closing_bias(engine).items()}
    msgs = [{"role": "user", "content": "Describe a cat in JSON."}]
    kw = dict(model="m", messages=msgs, max_tokens=64, temperature=0, logit_bias=bias,
              response_format={"type": "json_object"})
    r = server.client().chat.completions.create(**kw)
    ref = engine.chat(msgs, max_tokens=64, temperature=0, logit_bias=_closing_bias(engine), json_object=True)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason == "stop"
    assert _json_object(r.choices[0].message.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in server.client().chat.completions.create(
        stream=True, **kw) if c.choices)
    assert streamed == ref.text


def test_response_format_json_schema(server, engine):
    msgs = [{"role": "user", "content": "A person, please."}]
    tb = engine.tokenizer.token_bytes()
    bias = {i: 3.0 for i, b in enumerate(tb) if b and (b"}" in b or b'"' in b)}
    bias |= {i: -5.0 for i, b in enumerate(tb) if b and not b.strip()}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    finished = 0
    for seed in range(3):
        r = server.client().chat.completions.create(model="m", messages=msgs, max_tokens=80, seed=seed,
                                                    logit_bias={str(k): v for k, v in bias.items()}, response_format=fmt)
        ref = engine.chat(msgs, max_tokens=80, seed=seed, logit_bias=bias, json_schema=PERSON)
        assert r.choices[0].message.content == ref.text
        state = JsonState.start(compile_schema(PERSON)).feed(ref.text.encode())
        assert state is not None  # cut short by max_tokens or not, a prefix of a valid document
        if ref.finish_reason == "stop":
            finished += 1
            jsonschema.validate(json.loads(ref.text), PERSON)
    assert finished >= 1


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"oneOf": [{"type": "string"}, {}]}}}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}},
    {"type": "json_schema", "json_schema": "nope"},
    {"type": "yaml"},
])
def test_bad_response_formats_are_400s(server, fmt):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                response_format=fmt)
    err = assert_error_schema(e.value.response.json())
    assert err["param"] == "response_format"


def test_review_regressions_dead_ends_and_schema_errors():
    """A strict object whose keys are used up accepts no further ',' or '"' (it used to reach a state
    that accepts no byte, failing the whole batch); invalid schemas are SchemaErrors."""
    strict = compile_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                             "additionalProperties": False})
    assert JsonState.start(strict).feed(b'{"a":1,') is None and JsonState.start(strict).feed(b'{"a":1}').done
    assert JsonState.start(compile_schema({"type": "object", "additionalProperties": False})).feed(b'{"') is None
    typed = compile_schema({"type": "object", "properties": {"a": {"type": "string", "enum": ["x", 1]}}})
    assert JsonState.start(typed).feed(b'{"a":1}') is None and JsonState.start(typed).feed(b'{"a":"x"}').done
    for bad, match in [({"type": "object", "properties": {"x": {"type": "array", "minItems": 3, "maxItems": 1}}},
                        "minItems > maxItems"),
                       ({"type": "object", "properties": {"a": {"enum": [float("nan")]}}}, "cannot write"),
                       ({"type": "object", "properties": {"a": {"type": "string", "const": 1}}}, "no enum/const")]:
        with pytest.raises(SchemaError, match=match):
            compile_schema(bad)


def test_exclusive_one_of_is_enforced_like_any_of():
    kinds = compile_schema({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "null"}]}}})
    assert JsonState.start(kinds).feed(b'{"a":null}').done and JsonState.start(kinds).feed(b'{"a":1') is None
    tagged = compile_schema({"type": "object", "properties": {"a": {"oneOf": [
        {"type": "object", "properties": {"k": {"const": True}, "n": {"type": "integer"}}, "required": ["k"]},
        {"type": "object", "properties": {"k": {"const": 1}, "s": {"type": "string"}}, "required": ["k"]}]}}})
    assert JsonState.start(tagged).feed(b'{"a":{"k":1,"s":"x"}}').done
    assert JsonState.start(tagged).feed(b'{"a":{"k":true,"n":2}}').done
    assert JsonState.start(tagged).feed(b'{"a":{"k":1,"n"') is not None  # n is allowed in the free 2nd branch too
    assert JsonState.start(tagged).feed(b'{"a":{"k":true,"n":"x"') is None


def test_review_regressions_aliases_and_nested_unions():
    """A definition that is only a $ref to a schema still being compiled (the root here) refers to
    it instead of copying its empty start: it used to accept anything and crash at '[[' ."""
    alias = {"type": "object", "$defs": {"Tree": {"$ref": "#"}},
             "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}}}
    tree = compile_schema(alias)
    for text in ['{"children":["leaf"]}', '{"children":[[1]]}', '{"children":[{"children":[]}]}']:
        state = JsonState.start(tree).feed(text.encode())
        assert (state is not None and state.done) == _valid(text, alias), text
    # overlapping branches nested in each other: the readings stay bounded, and what is written is valid
    nested = {"type": "object", "$defs": {"N": {"anyOf": [
        {"type": "object", "additionalProperties": {"$ref": "#/$defs/N"}},
        {"type": "object", "properties": {"id": {"type": "integer"}}, "additionalProperties": {"$ref": "#/$defs/N"}}]}},
        "additionalProperties": {"$ref": "#/$defs/N"}}
    text = '{"a":' * 16 + '{"id":1}' + "}" * 16
    state = JsonState.start(compile_schema(nested))
    for i in range(len(text)):
        state = state.feed(text[i].encode())
        assert state is not None and len(state.paths) <= MAX_READINGS
    assert state.done and _valid(text, nested)


def test_a_dead_end_fails_only_its_row(engine):
    """Safety net: should a row's constraint ever find no token, that row goes on unconstrained and
    its batch neighbours are untouched."""
    from nanoseek.engine import LogitsProcessor, SamplingParams

    class Stuck(JsonConstraint):
        def choose(self, *a):
            raise ValueError("stuck")

    params = [SamplingParams(temperature=0), SamplingParams(temperature=0)]
    proc = LogitsProcessor(params, [[1], [1]], 8, "cpu", constraints=[Stuck([b"x"] * 8, {0}), None])
    logits = torch.arange(16.0).reshape(2, 8)
    assert proc.sample(logits).tolist() == [7, 7] and proc.constraints[0] is None

    class Breaks(JsonConstraint):  # chooses, then fails to advance: the row goes free, the batch on
        def advance(self, token):
            raise AttributeError("broken")

    proc = LogitsProcessor(params, [[1], [1]], 8, "cpu", constraints=[Breaks([b"{"] * 8, {0}), None])
    assert proc.sample(logits).tolist() == [7, 7] and proc.constraints[0] is None
