"""Forced tool calls: `tool_choice` "required" or a named function (engine/toolcalls.py).

Oracles: the output parser of server/tools.py (`split_tool_calls`, tested on its own in
test_server_tools.py) reads the calls back, `jsonschema` validates their arguments, the model's own
chat template writes the markup the constraint must accept, and the `openai` client reads the
server's answers. Random walks through the constraint (every step a random allowed token) must end
in calls that parse and validate, whatever the walk.
"""

from __future__ import annotations

import json
import random

import pytest

from nanoseek.engine import SamplingError
from nanoseek.engine.toolcalls import ToolCallConstraint, ToolCallRule, markup_of, rule_for
from nanoseek.server.tools import split_tool_calls
from nanoseek.tokenizer import (EOS, TOOL_CALL_BEGIN as CB, TOOL_CALL_END as CE, TOOL_CALLS_BEGIN as B,
                                TOOL_CALLS_END as E, TOOL_SEP as SEP)

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {
             "q": {"anyOf": [{"type": "string"}, {"type": "null"}]}}, "required": ["q"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}

# V3 / R1's way of writing calls (the newline between two calls is V3's), in a minimal template
V3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content or '' }}"
    "{% if m.tool_calls %}<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}{% if not loop.first %}\n{% endif %}"
    "<｜tool▁call▁begin｜>{{ c.type }}<｜tool▁sep｜>{{ c.function.name }}\n```json\n{{ c.function.arguments }}\n```"
    "<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def _check_calls(text: str, names: set[str]) -> list:
    """The oracle: the output is calls only, each naming an offered function, its arguments valid."""
    content, calls = split_tool_calls(text)
    assert content.strip() == "" and calls, text
    for c in calls:
        assert c.name in names, text
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    return calls


# ---- the constraint on its own: a byte-per-token vocabulary plus a few longer tokens ---------------

MARKERS = [B, E, CB, CE, SEP]
PIECES = [b"function", b"get_weather", b"get", b"\n```json\n", b"\n```", b'{"city":"', b'"}', b"}\n```", b' "',
          b"\n\n", b" now", CE.encode()[:7], CE.encode()[7:]]  # (the last two: a marker's text, in two tokens)
TABLE: list[bytes | None] = [bytes([i]) for i in range(128)] + PIECES + [None] * (len(MARKERS) + 1)
MARKER_IDS = {m: 128 + len(PIECES) + i for i, m in enumerate(MARKERS)}
EOS_ID = len(TABLE) - 1


def _decode(ids: list[int]) -> str:
    names = {i: m for m, i in MARKER_IDS.items()}
    return "".join(names[i] if i in names else (EOS if i == EOS_ID else TABLE[i].decode()) for i in ids)


def _constraint(markup: str, functions=None, parallel: bool = True) -> ToolCallConstraint:
    rule = ToolCallRule(functions or tuple((t["function"]["name"], t["function"].get("parameters")) for t in TOOLS),
                        markup, parallel)
    return ToolCallConstraint(TABLE, {EOS_ID}, MARKER_IDS, rule, rule.compile())


def _walk(c: ToolCallConstraint, rng: random.Random, steps: int = 400) -> list[int] | None:
    """Random allowed tokens until the end of the turn (None if it did not end in `steps`). Closing
    bytes weigh more, so that walks end."""
    closing = {ord(x) for x in '"}]0123456789,'} | set(MARKER_IDS.values()) | {EOS_ID}
    ids = []
    for _ in range(steps):
        allowed = [t for t in range(len(TABLE)) if c.allowed(t)]
        assert allowed, _decode(ids)  # never a dead end
        listed = c.candidates()
        if listed is not None:
            assert set(listed) <= set(allowed) and listed
        t = rng.choices(allowed, [30 if t in closing else 1 for t in allowed])[0]
        ids.append(t)
        c.advance(t)
        if c.done:
            return ids
    return None


@pytest.mark.parametrize("markup", ["v3", "v3.1"])
@pytest.mark.parametrize("parallel", [True, False])
def test_random_walks_end_in_valid_calls(markup, parallel):
    ended = 0
    for seed in range(40):
        ids = _walk(_constraint(markup, parallel=parallel), random.Random(seed))
        if ids is None:
            continue
        ended += 1
        text = _decode(ids)
        assert text.startswith(B) and text.endswith(E + EOS)
        calls = _check_calls(text.removesuffix(EOS), set(SCHEMAS))
        assert parallel or len(calls) == 1
    assert ended >= 20


def test_a_named_function_is_called_once():
    functions = (("get", SCHEMAS["get"]),)
    free = _constraint("v3.1", (("now", None),), parallel=False)  # no parameters: any object
    assert _feed(free, [B, CB, b"now", SEP, b'{"a":[1,{"b":null}]}', CE, E])
    for seed in range(20):
        ids = _walk(_constraint("v3.1", functions, parallel=False), random.Random(seed))
        if ids is not None:
            assert [c.name for c in _check_calls(_decode(ids).removesuffix(EOS), {"get"})] == ["get"]


def test_calls_or_json_walks_end_in_one_or_the_other():
    """tool_choice "auto" beside JSON output: either constraint, whichever the tokens keep alive;
    every finished walk is valid calls or a JSON document the schema accepts."""
    from nanoseek.engine.constraints import EitherConstraint, JsonConstraint, compile_schema

    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    rule = ToolCallRule(tuple((t["function"]["name"], t["function"]["parameters"]) for t in TOOLS), "v3.1",
                        optional=True)
    kinds = set()
    for seed in range(40):
        c = EitherConstraint([JsonConstraint(TABLE, {EOS_ID}, compile_schema(answer)),
                              ToolCallConstraint(TABLE, {EOS_ID}, MARKER_IDS, rule, rule.compile())])
        rng, ids = random.Random(seed), []
        closing = {ord(x) for x in '"}]0123456789,'} | set(MARKER_IDS.values()) | {EOS_ID}
        for _ in range(400):
            allowed = [t for t in range(len(TABLE)) if c.allowed(t)]
            assert allowed, _decode(ids)
            t = rng.choices(allowed, [30 if t in closing else 1 for t in allowed])[0]
            if t == EOS_ID:
                text = _decode(ids)
                if text.startswith(B):
                    _check_calls(text, set(SCHEMAS))
                    kinds.add("calls")
                else:
                    jsonschema.validate(json.loads(text), answer)
                    kinds.add("json")
                break
            ids.append(t)
            c.advance(t)
    assert kinds == {"calls", "json"}
    with pytest.raises(SamplingError, match="goes with json_object"):
        from nanoseek.engine import SamplingParams
        SamplingParams(tool_call=rule)
    lenient = ToolCallRule((("f", {"type": "object", "properties": {"a": {"pattern": "x"}}}),), optional=True)
    assert lenient.compile()[b"f"] is not None  # optional: unsupported parameters take any object


def _feed(c: ToolCallConstraint, pieces: list) -> bool:
    """Feed markers (str) and text (bytes, one token per byte); False at the first refused token."""
    for p in pieces:
        for t in ([MARKER_IDS[p]] if isinstance(p, str) else list(p)):
            if not c.allowed(t):
                return False
            c.advance(t)
    return True


def test_what_is_refused():
    call = [B, CB, b"get", SEP, b'{"q":null}', CE]
    assert _feed(_constraint("v3.1"), call + [E]) and _feed(_constraint("v3.1"), [B, CB, b"  now", SEP, b"{}", CE])
    for bad in ([b"x"],  # text before the calls
                [B, E],  # no call
                [B, CB, b"gets", SEP],  # not an offered name
                [B, CB, b"get_", SEP],  # half a name
                [B, CB, b"get", SEP, b'{"q":1}'],  # arguments against the schema
                [B, CB, b"get", SEP, b"{}", CE],  # a required argument missing
                [B, CB, b"get", SEP, b'{"q":null}', E],  # the call not closed
                [B, CB, b"function", SEP]):  # V3's head in V3.1's markup
        assert not _feed(_constraint("v3.1"), bad), bad
    assert not _feed(_constraint("v3.1", parallel=False), call + [CB])  # one call only
    v3 = [B, CB, b"function", SEP, b"get_weather\n```json\n", b'{"city":"Paris","days":[1,2]}', b"\n```", CE]
    assert _feed(_constraint("v3"), v3 + [b"\n", CB, b"function", SEP, b'now\n```json\n{}\n```', CE, E])
    assert not _feed(_constraint("v3"), [B, CB, b"get_weather", SEP])  # V3.1's head in V3's markup
    assert not _feed(_constraint("v3"), v3[:4] + [b"get_weather\n```json\n", b'{"city":"P","days":[1,2,3,4]'])
    c = _constraint("v3")
    assert _feed(c, [B]) and c.candidates() == [MARKER_IDS[CB]]  # the one way on, without a search


def test_review_regressions():
    # a marker's text written as plain tokens inside the arguments would end the call for a reader
    text_ce = [128 + len(PIECES) - 2, 128 + len(PIECES) - 1]
    c = _constraint("v3.1")
    assert _feed(c, [B, CB, b"get", SEP, b'{"q":"']) and c.allowed(text_ce[0])
    c.advance(text_ce[0])
    assert not c.allowed(text_ce[1])  # the marker would be complete
    # only a marker can follow: it is listed, so no search of the vocabulary
    c = _constraint("v3")
    assert _feed(c, [B, CB, b"function"]) and c.candidates() == [MARKER_IDS[SEP]]
    assert _feed(c, [SEP, b'now\n```json\n{}\n```']) and c.candidates() == [MARKER_IDS[CE]]
    c = _constraint("v3.1")
    assert _feed(c, [B, CB, b"get"]) and c.candidates() is None  # "get" may go on to "get_weather"
    # after the turn, stop tokens stay allowed (ignore_eos rows keep going)
    c = _constraint("v3.1")
    assert _feed(c, [B, CB, b"now", SEP, b"{}", CE, E]) and c.allowed(EOS_ID)
    c.advance(EOS_ID)
    assert c.done and c.allowed(EOS_ID) and not c.allowed(ord("x"))
    from nanoseek.engine.constraints import SchemaError

    with pytest.raises(SchemaError, match="appears twice"):
        ToolCallRule((("f", None), ("f", {"type": "object"}))).compile()


def test_rules_from_tool_choice():
    assert rule_for(TOOLS, "auto", "v3") is None and rule_for(TOOLS, "none", "v3") is None
    assert [n for n, _ in rule_for(TOOLS, "required", "v3").functions] == ["get_weather", "get", "now"]
    named = rule_for(TOOLS, {"type": "function", "function": {"name": "now"}}, "v3.1")
    assert named.functions == (("now", SCHEMAS["now"]),) and not named.parallel and named.markup == "v3.1"
    assert rule_for([{"type": "function", "function": {"name": "f"}}], "required", "v3").functions == (("f", None),)
    with pytest.raises(ValueError, match="not among the tools"):
        rule_for(TOOLS, {"type": "function", "function": {"name": "nope"}}, "v3")
    with pytest.raises(ValueError, match="tool_choice must be"):
        rule_for(TOOLS, "always", "v3")
    from nanoseek.engine.constraints import SchemaError

    with pytest.raises(SchemaError, match="function 'f' parameters: .*'pattern' is not supported"):
        ToolCallRule((("f", {"type": "object", "properties": {"a": {"pattern": "x"}}}),)).compile()
    with pytest.raises(SchemaError, match="function name"):
        ToolCallRule((("has space", None),)).compile()


# ---- the engine: the model's own template says which markup --------------------------------------

from test_server_support import random_model_dir, tool_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def tooled(tmp_path_factory):
    return tool_model_dir(tmp_path_factory.mktemp("forced"))


@pytest.fixture(scope="module")
def engine(tooled):
    from nanoseek.engine import Engine

    return Engine(str(tooled["dir"]), seed=0)


def _render_calls(tok, calls: list[tuple[str, str]]) -> str:
    """The assistant's part of a turn with these calls, as the template writes it (from the markup on)."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}} for i, (n, a) in
        enumerate(calls)]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False)
    return text[text.index(B):]


@pytest.mark.parametrize("template", ["own", "v3"])
def test_the_constraint_accepts_what_the_template_writes(engine, template):
    """Token by token, as the model's tokenizer encodes the template's rendering of two calls."""
    from nanoseek.engine.toolcalls import marker_ids
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_file(engine.model_dir)
    if template == "v3":
        tok.set_chat_template(V3_TEMPLATE)
    markup = markup_of(lambda m: tok.apply_chat_template(m, add_generation_prompt=False))
    assert markup == {"own": "v3.1", "v3": "v3"}[template]
    calls = [("get_weather", '{"city": "Paris", "unit": "c"}'), ("now", "{}")]
    text = _render_calls(tok, calls)
    rule = rule_for(TOOLS, "required", markup)
    c = ToolCallConstraint(tok.token_bytes(), {tok.eos_id}, marker_ids(tok), rule, rule.compile())
    for t in tok.encode(text):
        assert c.allowed(t), (tok.decode([t]), text)
        c.advance(t)
    assert c.done
    assert [(x.name, x.arguments) for x in split_tool_calls(text.removesuffix(EOS))[1]] == calls


def _nudge(engine) -> dict[int, float]:
    """A bias toward closing strings and objects and away from blank runs, so that this random-ish
    model ends its arguments within a test's token budget (what it writes stays its own choice)."""
    tb = engine.tokenizer.token_bytes()
    bias = {i: 3.0 for i, b in enumerate(tb) if b and (b"}" in b or b'"' in b)}
    return bias | {i: -5.0 for i, b in enumerate(tb) if b and not b.strip()}


def test_a_named_tool_use_template_decides_the_markup(engine):
    """Templates named "default" (no tool calls) and "tool_use" (V3.1's): a request with tools
    renders with tool_use, so its markup is forced."""
    from nanoseek.engine import Engine
    from nanoseek.tokenizer import Tokenizer

    own = Tokenizer.from_file(engine.model_dir)
    named = [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"},
             {"name": "tool_use", "template": own.chat_template}]
    e = Engine(engine.model, tokenizer=Tokenizer(own.backend, chat_template=named))
    assert e.tool_call_markup(TOOLS) == "v3.1" and e.tool_call_rule(TOOLS, "required").markup == "v3.1"
    alone = Engine(engine.model, tokenizer=Tokenizer(own.backend, chat_template=named[:1]))
    assert alone.tool_call_markup(TOOLS) is None


def test_engine_forces_calls(engine, tooled):
    msgs = [{"role": "user", "content": "Weather?"}]
    free = engine.chat(msgs, tools=TOOLS, max_tokens=40, temperature=0)
    assert not free.text.startswith(B)  # the model's own first choice is a word
    for choice in ("required", {"type": "function", "function": {"name": "now"}}):
        r = engine.chat(msgs, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0, logit_bias=_nudge(engine))
        assert r.finish_reason == "stop" and r.text.startswith(B)
        calls = _check_calls(r.text, {"now"} if isinstance(choice, dict) else set(SCHEMAS))
        assert isinstance(choice, str) or len(calls) == 1
    finished = 0
    for seed in range(6):  # sampled: whatever the draw, the calls are valid
        r = engine.chat(msgs, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=1.0, seed=seed,
                        logit_bias=_nudge(engine))
        if r.finish_reason == "stop":
            finished += 1
            _check_calls(r.text, set(SCHEMAS))
    assert finished >= 3


def test_engine_answers_calls_or_json_beside_tools(engine):
    """json_object with tools (tool_choice auto): the model may call a tool or answer in JSON."""
    from nanoseek.tokenizer import TOOL_CALLS_BEGIN

    msgs = [{"role": "user", "content": "Weather?"}]
    tb = engine.tokenizer.token_bytes()
    quote = {i: 4.0 for i, b in enumerate(tb) if b and b'"' in b} | {i: -5.0 for i, b in enumerate(tb)
                                                                      if b and not b.strip()}
    to_call = quote | {engine.tokenizer.token_to_id(TOOL_CALLS_BEGIN): 8.0}
    r = engine.chat(msgs, tools=TOOLS, json_object=True, max_tokens=80, temperature=0, logit_bias=to_call)
    assert r.finish_reason == "stop" and r.text.startswith(B)
    _check_calls(r.text, set(SCHEMAS))
    r = engine.chat(msgs, tools=TOOLS, json_object=True, max_tokens=80, temperature=0, logit_bias=quote)
    assert not r.text.startswith(B) and isinstance(json.loads(r.text), dict)


def test_engine_refuses_what_it_cannot_force(engine, tmp_path):
    from nanoseek.engine import Engine

    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(SamplingError, match="not among the tools"):
        engine.chat(msgs, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(SamplingError, match="does not combine with speculative"):
        engine.chat(msgs, tools=TOOLS, tool_choice="required", speculative=1)
    with pytest.raises(SamplingError, match="cannot be combined with thinking"):
        engine.chat(msgs, tools=TOOLS, tool_choice="required", thinking=True)
    plain = Engine(str(random_model_dir(tmp_path)))  # the built-in template writes no tool calls
    with pytest.raises(SamplingError, match="needs a chat template that writes tool calls"):
        plain.chat(msgs, tools=TOOLS, tool_choice="required")


# ---- the server, through the openai client --------------------------------------------------------

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_server_support import assert_error_schema, served  # noqa: E402


@pytest.fixture(scope="module")
def server(tooled, tmp_path_factory):
    yield from served(tooled["dir"], tmp_path_factory, "forced", "--max-model-len", "1024")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get"}}])
def test_server_forces_calls(server, engine, choice):
    msgs = [{"role": "user", "content": "Weather?"}]
    bias = _nudge(engine)
    kw = dict(model="m", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0,
              logit_bias={str(k): v for k, v in bias.items()})
    c = server.client().chat.completions.create(**kw).choices[0]
    ref = engine.chat(msgs, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0, logit_bias=bias)
    calls = _check_calls(ref.text, set(SCHEMAS))
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert [(x.function.name, x.function.arguments) for x in c.message.tool_calls] == [
        (x.name, x.arguments) for x in calls]
    if isinstance(choice, dict):
        assert [x.function.name for x in c.message.tool_calls] == ["get"]
    chunks = list(server.client().chat.completions.create(stream=True, **kw))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(x.name, x.arguments) for x in calls]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_server_answers_calls_or_json_beside_tools(server, engine):
    from nanoseek.tokenizer import TOOL_CALLS_BEGIN

    tb = engine.tokenizer.token_bytes()
    quote = {str(i): 4.0 for i, b in enumerate(tb) if b and b'"' in b}
    kw = dict(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=80,
              temperature=0, response_format={"type": "json_object"})
    c = server.client().chat.completions.create(
        logit_bias=quote | {str(engine.tokenizer.token_to_id(TOOL_CALLS_BEGIN)): 8.0}, **kw).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    c = server.client().chat.completions.create(logit_bias=quote, **kw).choices[0]
    assert not c.message.tool_calls and isinstance(json.loads(c.message.content), dict)


@pytest.mark.parametrize("extra,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}}}]},
     "tools"),
])
def test_server_refuses_what_it_cannot_force(server, extra, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(**body)
    assert assert_error_schema(e.value.response.json())["param"] == param
    assert server.alive()
