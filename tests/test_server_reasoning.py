"""Reasoning output (`<think>` ... `</think>` -> reasoning_content) and the chat page.

The parser is checked as a pure function (every way of cutting the text into stream deltas gives
the one-shot split); end to end, a tiny model whose weights are edited into a bigram table always
answers `<think>\\n R </think> A <eos>`, served live, read through the `openai` client and in
headless Chromium (Debian's `chromium`, driven by Playwright) on the page at /.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.server.reasoning import ReasoningParser, reasoning_token_count, split_reasoning

# ---- the parser, as a pure function ------------------------------------------------------------------

CASES = [
    ("<think>\nplan</think>\n\nanswer", False, "plan", "answer"),
    ("<think>plan</think>answer", False, "plan", "answer"),
    ("  <think>plan</think>answer", False, "plan", "answer"),
    ("plan</think>answer", True, "plan", "answer"),
    ("\nplan\n</think>\n\nanswer\n", True, "plan\n", "answer\n"),
    ("just an answer", False, None, "just an answer"),
    ("an answer with <think>inside</think>", False, None, "an answer with <think>inside</think>"),
    ("<think>never closed", False, "never closed", ""),
    ("still thinking", True, "still thinking", ""),
    ("", False, None, ""),
    ("", True, "", ""),
    ("<thi", False, None, "<thi"),
    ("<think></think>", False, "", ""),
    ("a</think>b</think>c", True, "a", "b</think>c"),
    ("x </thin", True, "x </thin", ""),
]


@pytest.mark.parametrize("text,started,reasoning,content", CASES)
def test_split_reasoning(text, started, reasoning, content):
    assert split_reasoning(text, started) == (reasoning, content)


def _streamed(pieces: list[str], started: bool) -> tuple[str | None, str]:
    p = ReasoningParser(started)
    r = c = ""
    for piece in pieces:
        dr, dc = p.feed(piece)
        r, c = r + dr, c + dc
    dr, dc = p.finish()
    return (r + dr if p.saw_reasoning else None), c + dc


@pytest.mark.parametrize("text,started,reasoning,content", CASES)
def test_every_two_and_three_way_split_streams_the_same(text, started, reasoning, content):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _streamed([text[:i], text[i:j], text[j:]], started) == (reasoning, content), (i, j)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(parts=st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "a", "bc", "</thi"]),
                      max_size=12),
       cuts=st.lists(st.integers(0, 60), max_size=6), started=st.booleans())
def test_streaming_equals_one_shot_on_random_texts(parts, cuts, started):
    text = "".join(parts)
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    assert _streamed(pieces, started) == split_reasoning(text, started)


def test_reasoning_token_count():
    assert reasoning_token_count([5, 10, 11, 6, 12, 1], 6, True) == 4
    assert reasoning_token_count([10, 11], 6, True) == 2
    assert reasoning_token_count([10, 6, 11], 6, False) == 0
    # a </think> written in pieces ("<", "/", "think", ">"): the reasoning ends with its last piece
    pieces = ["plan", " more", "<", "/", "think", ">", "\n\n", "answer", ""]
    text = "".join(pieces)
    offsets = [len("".join(pieces[:i])) for i in range(len(pieces))]
    assert reasoning_token_count(list(range(20, 29)), 6, True, text, offsets) == 6
    assert reasoning_token_count(list(range(20, 29)), 6, True, "plan <", offsets) == 9  # unclosed: all
    # pieces first, then a </think> token in the answer: the reasoning ended with the pieces
    ids, text = [10, 11, 12, 13, 20, 6, 21], "R</think>A</think>B"
    assert reasoning_token_count(ids, 6, True, text, [0, 1, 3, 8, 9, 10, 18]) == 4


# ---- end to end: a model that always reasons ------------------------------------------------------------

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from nanoseek.engine import Engine  # noqa: E402
from test_server_support import LiveServer, scripted_model_dir  # noqa: E402

KEY = "sk-page-key"
MSGS = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return scripted_model_dir(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def site():
    """Another web origin: a blank page on its own port, for the cross-origin (CORS) check."""
    import http.server
    import threading

    class Blank(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>another site</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(scripted, site, tmp_path_factory):
    s = LiveServer(scripted["dir"], "--max-model-len", "64", "--served-model-name", "r1-tiny",
                   "--allowed-origins", f"http://127.0.0.1:{site}", api_key=KEY,
                   log_dir=tmp_path_factory.mktemp("logs"), name="reasoning")
    yield s
    s.stop()


def test_reasoning_content_non_streaming(server, scripted):
    client = server.client()
    r = client.chat.completions.create(model="r1-tiny", messages=MSGS, max_tokens=30, temperature=0)
    m = r.choices[0].message
    assert m.reasoning_content == scripted["reasoning"] and m.content == scripted["answer"]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == scripted["tokens"]  # <think> \n R(3) </think> A(3) <eos>
    assert r.usage.completion_tokens_details.reasoning_tokens == 6
    # thinking mode: the prompt ends with "<think>\n", the output is R </think> A <eos>
    # (enable_thinking: other servers' name for it; `thinking: {"type": "enabled"}`: DeepSeek's API's)
    for extra in ({"chat_template_kwargs": {"thinking": True}}, {"chat_template_kwargs": {"enable_thinking": True}},
                  {"thinking": {"type": "enabled"}}):
        r = client.chat.completions.create(model="r1-tiny", messages=MSGS, max_tokens=30, temperature=0,
                                           extra_body=extra)
        m = r.choices[0].message
        assert (m.reasoning_content, m.content) == (scripted["reasoning"], scripted["answer"])
        assert r.usage.completion_tokens == scripted["tokens"] - 2
        assert r.usage.completion_tokens_details.reasoning_tokens == 4
    off = client.chat.completions.create(model="r1-tiny", messages=MSGS, max_tokens=30, temperature=0,
                                         extra_body={"thinking": {"type": "disabled"}})
    assert off.usage.completion_tokens == scripted["tokens"]  # the prompt opened no block: as by default
    for bad in ({"thinking": {"type": "on"}}, {"thinking": {"type": "disabled"}, "chat_template_kwargs": {
            "thinking": True}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="r1-tiny", messages=MSGS, max_tokens=3, extra_body=bad)
    # unfinished reasoning (max_tokens inside the block) is all reasoning
    r = client.chat.completions.create(model="r1-tiny", messages=MSGS, max_tokens=3, temperature=0)
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    assert scripted["reasoning"].startswith(r.choices[0].message.reasoning_content)
    # completions are raw text: the tags stay
    c = client.completions.create(model="r1-tiny", prompt=[0, 3, 10, 4], max_tokens=30, temperature=0)
    assert c.choices[0].text == "<think>\n" + scripted["reasoning"] + "</think>" + scripted["answer"]


# A V3.1-style template (written for these tests): an assistant turn opens with </think> (answer),
# or with <think> when it is a prefix being continued in thinking mode, as DeepSeek-V3.1's does.
V31_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<｜Assistant｜>"
    "{% if m.prefix is defined and m.prefix and thinking %}<think>{% else %}</think>{% endif %}"
    "{{ m.content }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}"
)


def test_a_prefix_continues_inside_reasoning_when_its_turn_opened_it(server, scripted, tmp_path_factory):
    """Chat prefix completion in thinking mode: the template sees DeepSeek's `prefix` flag (V3.1's
    opens <think> for it), and the output starts inside reasoning whenever the open turn's last
    <think> is unclosed, however long the prefix after it."""
    r_ids = scripted["reasoning_ids"]
    engine = Engine(scripted["dir"])
    tok = engine.tokenizer
    rest = tok.decode(r_ids[1:])
    # the built-in template: the prefix itself opens the block and starts the reasoning
    prefix = [*MSGS, {"role": "assistant", "content": "<think>\n" + tok.decode(r_ids[:1]), "prefix": True}]
    ids = engine.chat_prompt([*MSGS, {"role": "assistant", "content": prefix[-1]["content"]}],
                             continue_final_message=True)
    assert ids[-3:] == [tok.token_to_id("<think>"), tok.encode("\n")[0], r_ids[0]]
    for stream in (False, True):
        got = server.client().chat.completions.create(model="r1-tiny", messages=prefix, max_tokens=30, temperature=0,
                                                      stream=stream)
        if stream:
            parts = [c.choices[0].delta for c in got if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in parts)
            content = "".join(d.content or "" for d in parts)
        else:
            reasoning, content = got.choices[0].message.reasoning_content, got.choices[0].message.content
        assert (reasoning, content) == (rest, scripted["answer"]), stream
    # a V3.1-style template opens <think> for a prefix in thinking mode, </think> otherwise
    tmpl = tmp_path_factory.mktemp("v31") / "template.jinja"
    tmpl.write_text(V31_STYLE, encoding="utf-8")
    s = LiveServer(scripted["dir"], "--max-model-len", "64", "--chat-template", str(tmpl), api_key=KEY,
                   log_dir=tmp_path_factory.mktemp("logs"), name="v31")
    try:
        msgs = [*MSGS, {"role": "assistant", "content": "\n", "prefix": True}]
        r = s.client().chat.completions.create(model="m", messages=msgs, max_tokens=30, temperature=0,
                                               extra_body={"thinking": {"type": "enabled"}})
        m = r.choices[0].message
        assert (m.reasoning_content, m.content) == (scripted["reasoning"], scripted["answer"])
        r = s.client().chat.completions.create(model="m", messages=msgs, max_tokens=30, temperature=0)
        assert r.choices[0].message.reasoning_content is None  # </think>\n: an answer, not reasoning
    finally:
        s.stop()


def test_reasoning_content_streaming_deltas(server, scripted):
    client = server.client()
    order = []
    reasoning = content = ""
    for ch in client.chat.completions.create(model="r1-tiny", messages=MSGS, max_tokens=30, temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
        if not ch.choices:
            assert ch.usage.completion_tokens_details.reasoning_tokens == 6
            continue
        d = ch.choices[0].delta
        r = getattr(d, "reasoning_content", None)
        if r:
            reasoning += r
            order.append("r")
        if d.content:
            content += d.content
            order.append("c")
    assert (reasoning, content) == (scripted["reasoning"], scripted["answer"])
    assert order == sorted(order, reverse=True) and order.count("r") >= 2 and order.count("c") >= 2


def test_reasoning_and_answer_never_share_a_delta(server, scripted):
    # a stop string holds text back, so the last chunk releases the end of the reasoning and the
    # answer at once: DeepSeek's stream sends them as two deltas, reasoning first
    deltas = [c.choices[0].delta for c in server.client().chat.completions.create(
        model="r1-tiny", messages=MSGS, max_tokens=30, temperature=0, stream=True, stop=["never there" * 4])
        if c.choices]
    both = [d for d in deltas if getattr(d, "reasoning_content", None) and d.content]
    assert not both
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == scripted["reasoning"]
    assert "".join(d.content or "" for d in deltas) == scripted["answer"]


# A template in R1's manner: it opens <think> in the generation prompt, and writes nothing after
# tool results (the model goes on with the turn that called the tools)
R1_TOOLS_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<｜Assistant｜>{% if m.tool_calls %}[calls]{% else %}{{ m.content }}{% endif %}"
    "<｜end▁of▁sentence｜>{% elif m.role == 'tool' %}[output]{{ m.content }}[/output]{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1].role != 'tool' %}<｜Assistant｜><think>\n{% endif %}"
)


def test_a_think_tag_in_a_tool_result_opens_no_reasoning(scripted, tmp_path_factory):
    """Only what the template wrote opens a reasoning block: after a tool result the prompt ends
    without a new <｜Assistant｜>, and a "<think>" in that result is the tool's text."""
    tmpl = tmp_path_factory.mktemp("r1tools") / "template.jinja"
    tmpl.write_text(R1_TOOLS_STYLE, encoding="utf-8")
    s = LiveServer(scripted["dir"], "--max-model-len", "128", "--chat-template", str(tmpl), api_key=KEY,
                   log_dir=tmp_path_factory.mktemp("logs"), name="r1tools")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "fetch", "arguments": "{}"}}]
    try:
        client = s.client()
        for result in ("The page is empty.", "The page explains the <think> tag."):
            msgs = [*MSGS, {"role": "assistant", "content": None, "tool_calls": calls},
                    {"role": "tool", "tool_call_id": "call_1", "content": result}]
            r = client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0)
            assert r.choices[0].message.reasoning_content is None, result
            assert r.usage.completion_tokens_details.reasoning_tokens == 0
        # the generation prompt's own <think> still opens the block
        m = client.chat.completions.create(model="m", messages=MSGS, max_tokens=30, temperature=0).choices[0].message
        assert (m.reasoning_content, m.content) == (scripted["reasoning"], scripted["answer"])
    finally:
        s.stop()


# ---- the chat page in headless Chromium -------------------------------------------------------------------

CHROMIUM = os.environ.get("NANOSEEK_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser.new_page()
        browser.close()


def test_chat_page_streams_the_answer_and_shows_reasoning_apart(server, scripted, page):
    page.goto(server.url + "/")
    assert "r1-tiny" in page.title()
    assert page.is_visible("#apikey")  # the server wants a key: the page asks for it
    page.fill("#apikey", "wrong-key")
    page.dispatch_event("#apikey", "change")
    # as if the page was loaded before the server wanted a key: the 401 brings the key box back
    page.evaluate("document.getElementById('keybox').hidden = true")
    page.fill("#input", "Why is the sky blue?")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant[data-state=error]", timeout=20_000)
    assert "API key" in page.inner_text(".assistant .error")
    assert page.is_visible("#apikey")

    page.click("#clear")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    # count every text update of the answer and reasoning boxes: a streamed answer arrives in pieces
    page.evaluate("""() => {
        window.__updates = [];
        new MutationObserver((records) => {
            for (const r of records) {
                const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
                const box = el.closest('.answer, .reasoning-text');
                if (box) window.__updates.push([box.className, box.textContent]);
            }
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "Why is the sky blue?")
    page.click("#send")
    page.wait_for_selector(".assistant:not([data-state=streaming])", timeout=20_000)
    assert page.get_attribute(".assistant", "data-state") == "done", page.inner_text(".assistant")
    assert page.text_content(".assistant .answer") == scripted["answer"]
    assert page.is_visible(".assistant details.reasoning")
    assert page.text_content(".assistant .reasoning-text") == scripted["reasoning"]
    updates = page.evaluate("window.__updates")
    answers = [t for cls, t in updates if cls == "answer"]
    thoughts = [t for cls, t in updates if cls == "reasoning-text"]
    assert len(answers) >= 2 and len(thoughts) >= 2, updates  # token by token, not all at once
    assert answers[-1] == scripted["answer"] and all(scripted["answer"].startswith(a) for a in answers)
    assert "tokens" in page.inner_text(".assistant .meta")

    # a second turn sends the conversation so far
    page.fill("#input", "And at sunset?")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.assistant[data-state=done]').length == 2", timeout=20_000)
    assert page.locator(".user").count() == 2

    # the context is 64 tokens: later turns drop the oldest ones instead of failing
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)["messages"]) if r.method == "POST" else None)
    for i in range(4):
        page.fill("#input", f"Tell me more, part {i}?")
        page.press("#input", "Enter")
        page.wait_for_function(f"document.querySelectorAll('.assistant[data-state=done]').length == {3 + i}",
                               timeout=20_000)
    assert page.locator(".assistant .error").count() == 0
    assert sent[-1][-1]["content"] == "Tell me more, part 3?" and len(sent[-1]) < 2 * 6 - 1

    # "New chat" while an answer streams: the next request carries the new message alone
    sent.clear()
    page.fill("#input", "One more?")
    page.press("#input", "Enter")
    page.click("#clear")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=20_000)
    page.fill("#input", "A new conversation")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant[data-state=done]", timeout=20_000)
    assert [m["content"] for m in sent[-1]] == ["A new conversation"], sent


def test_a_page_on_an_allowed_origin_may_call_the_api_and_no_other(server, scripted, site, page):
    """In the browser: the server names http://127.0.0.1:SITE in --allowed-origins. A page there
    streams a chat answer with fetch (preflight and all); the same page reached as localhost, another
    origin, is refused by the browser itself."""
    call = """async ([url, key]) => {
        try {
            const r = await fetch(url + "/v1/chat/completions", {method: "POST", headers: {
                "Authorization": "Bearer " + key, "Content-Type": "application/json"},
                body: JSON.stringify({model: "m", messages: [{role: "user", content: "Hi"}], max_tokens: 30,
                                      temperature: 0, stream: true})});
            return [r.status, await r.text()];
        } catch (e) { return ["refused", String(e)]; }
    }"""
    page.goto(f"http://127.0.0.1:{site}/")
    status, body = page.evaluate(call, [server.url, KEY])
    assert status == 200 and body.rstrip().endswith("data: [DONE]"), (status, body[:300])
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"])
    assert text == scripted["answer"]
    page.goto(f"http://localhost:{site}/")
    assert page.evaluate(call, [server.url, KEY])[0] == "refused"


def test_the_rendered_prompt_decides_whether_the_output_starts_in_reasoning(tmp_path):
    # R1's template opens <think> whatever the request's flag; a template ignoring the flag never does
    from nanoseek.server.reasoning import prompt_opens_reasoning
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 300, show_progress=False)
    msgs = [{"role": "user", "content": "hi"}]

    def opens(t, thinking):
        return prompt_opens_reasoning(t.decode(t.chat_ids(msgs, thinking=thinking)[-4:]))

    # the open turn's last <think> decides, however far back it is
    assert prompt_opens_reasoning("<think>\nLet me see, a long prefix") and not prompt_opens_reasoning("</think>\n")
    assert not prompt_opens_reasoning("<think>a</think>b") and not prompt_opens_reasoning("")

    assert (opens(tok, False), opens(tok, True)) == (False, True)  # the built-in template follows the flag
    templates = {"r1": "{{ bos_token }}{% for m in messages %}{{ '<｜User｜>' + m['content'] }}{% endfor %}"
                       "{{ '<｜Assistant｜><think>\\n' }}",
                 "plain": "{% for m in messages %}{{ '<｜User｜>' + m['content'] }}{% endfor %}{{ '<｜Assistant｜>' }}"}
    for name, template in templates.items():
        tok.save(tmp_path / name)
        (tmp_path / name / "chat_template.jinja").write_text(template, encoding="utf-8")
        t = Tokenizer.from_file(tmp_path / name)
        assert (opens(t, False), opens(t, True)) == ((True, True) if name == "r1" else (False, False)), name
