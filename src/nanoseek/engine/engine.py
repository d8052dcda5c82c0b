"""The inference engine: batched generation on the latent KV cache, streaming, MTP speculation.

    engine = Engine("path/to/model")                       # or a preset, a Hub id, a model object
    engine.generate("Once upon a time", max_tokens=50, temperature=0.8, seed=1)
    engine.generate([[0, 5, 9], [0, 7]], max_tokens=20)    # token-id prompts, different lengths
    for chunk in engine.stream("Hello", max_tokens=20):     # text and token deltas
        print(chunk.text, end="")
    engine.generate(prompt, speculative=True)              # draft with the MTP module

How a batch runs:

* **Prefill** (the expanded MLA path): the prompts, right-padded to the longest, run in one forward
  that writes every layer's latent into a preallocated `LatentCache` ([batch, max_len,
  kv_lora_rank + qk_rope_head_dim] per layer) and computes the head only at each row's last prompt
  token. Padding sits after a row's tokens, so causal attention never lets a real token see it.
* **Decode** (the absorbed MLA path): one token per row per forward, each row at its own position
  (`start_pos` is a [B] tensor); attention masks cache slots past a row's position, so rows of
  different lengths -- and the stale padding -- are invisible. Outputs equal one-by-one generation
  (tokens exactly in fp32 greedy, logits to float rounding).
* Finished rows leave the batch (their cache rows are dropped), so the rest run at the smaller size.
* **Context policy**: a prompt of `max_position_embeddings` tokens or more (or the engine's
  `max_context`) is an error; otherwise generation stops with finish_reason "length" when the
  context is full, whatever max_tokens says.
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..model import DeepseekV3ForCausalLM, LatentCache
from ..model.attention import take
from ..model.transformer import gather_positions
from .sampling import LogitsProcessor, SamplingError, SamplingParams, make_params, raw_logprobs
from .constraints import EitherConstraint, JsonConstraint, TokenConstraint
from .toolcalls import ToolCallConstraint, ToolCallRule, marker_ids, markup_of, rule_for
from .speculative import mtp_next_tokens, speculative_accept

Prompt = str | Sequence[int]


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[float] | None = None  # per generated token, under the raw model distribution
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class StreamChunk:
    index: int  # which prompt
    token_ids: list[int]  # new tokens (several per step with speculation)
    text: str  # new text ("" without a tokenizer, or while a stop string might be forming)
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # set on the row's last chunk
    stop_reason: int | str | None = None
    top_logprobs: list[dict[int, float]] | None = None  # with logprobs=n > 0: the n most likely, per token


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_forwards: int = 0  # main-model forwards after prefill
    row_steps: int = 0  # sum over decode forwards of the rows in the batch
    drafted: int = 0
    accepted: int = 0
    speculative: int = 0  # drafts per step (0: off)
    decode_tokens: int = 0  # generated after the prefill forward (each row's first token comes with it)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a row gains per main-model decode forward (1.0 without speculation)."""
        return (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_forward=self.tokens_per_forward,
                 prefill_tok_s=self.prefill_tok_s, decode_tok_s=self.decode_tok_s)
        return d


# ---- one request's bookkeeping ----------------------------------------------------------------

def unfinished_tail(tokenizer, prompt: Sequence[int]) -> tuple[int, bytes]:
    """(tokens, bytes) of the character a token-id prompt ends inside of, which the output's first
    tokens finish (`Tokenizer.unfinished_tail`); (0, b"") for a tokenizer without byte tables."""
    if not prompt or not hasattr(tokenizer, "unfinished_tail"):
        return 0, b""
    return tokenizer.unfinished_tail(prompt)


class _Request:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, eos_ids: set[int],
                 tokenizer, context: int) -> None:
        self._args = (index, prompt, params, eos_ids, tokenizer, context)
        self.index = index
        self.prompt = prompt
        self.params = params
        self.tokenizer = tokenizer
        self.max_tokens = min(params.max_tokens, context - len(prompt))
        self.stop_ids = set(params.stop_token_ids or ()) | (set() if params.ignore_eos else eos_ids)
        self.output: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = "" if tokenizer is not None else None
        # Incremental detokenization (decoding the whole output at every token is quadratic):
        # text = text of output[:read] + what output[prefix:] decodes to beyond output[prefix:read].
        # Decoding from `prefix`, a few tokens back, keeps what a tokenizer does at the start of a
        # decode (a dropped leading space) on both sides of the subtraction.
        # A token-id prompt can end inside a UTF-8 character. Its tokens then seed the window, so
        # that the output's first tokens complete that character rather than decode as U+FFFD.
        seed = unfinished_tail(tokenizer, prompt)[0]
        self._seed = prompt[len(prompt) - seed:] if seed else []
        self._prefix, self._read = 0, seed
        self._read_text = ""
        self._prefix_text = tokenizer.decode(self._seed, skip_special=params.skip_special_tokens)[:-1] if seed else ""
        self.sent_text = 0
        self.sent_tokens = 0
        self.holdback = max((len(s) for s in params.stop_strings), default=1) - 1
        if self.max_tokens <= 0:
            self.finish_reason = "length"

    def restart(self) -> "_Request":
        """This request as it was before any token was generated (the scheduler runs a failed
        prefill again), with the same max_tokens (a scheduler may have clipped it)."""
        fresh = _Request(*self._args)
        fresh.max_tokens = self.max_tokens
        return fresh

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Position of the newest token: the next step's input, not yet in the cache. While the
        request is unfinished this equals the engine's device-side position `n`, so steps can
        choose their cache span without reading `n` back from the device."""
        return len(self.prompt) + len(self.output) - 1

    def add(self, token: int, logprob: float | None = None, top: dict[int, float] | None = None) -> bool:
        """Append one token; returns True when the request is finished."""
        if self.finished:
            return True
        self.output.append(token)
        if self.logprobs is not None:
            self.logprobs.append(float(logprob) if logprob is not None else float("nan"))
        if self.top_logprobs is not None:  # a batch computes the most any row asked for
            self.top_logprobs.append(dict(list(top.items())[:self.params.logprobs]) if top else {})
        if self.tokenizer is not None:
            old = self.text
            self._detokenize()
            if self.params.stop_strings:
                # an unfinished UTF-8 character decodes as U+FFFD, as long as the character it becomes:
                # search again from where the replacement characters began
                stable = len(old.rstrip("\ufffd"))
                start = max(0, min(stable, len(self.text)) - self.holdback)
                hits = [(self.text.find(s, start), s) for s in self.params.stop_strings]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    self.text = self.text[:i]
                    self.finish_reason, self.stop_reason = "stop", s
                    return True
        if token in self.stop_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif len(self.output) >= self.max_tokens:
            self.finish_reason = "length"
        return self.finished

    def _detokenize(self) -> None:
        skip = self.params.skip_special_tokens
        new = self.tokenizer.decode(self._ids(self._prefix), skip_special=skip)
        self.text = self._read_text + new[len(self._prefix_text):]
        if not new.endswith("\ufffd"):  # whole characters: move the window on
            self._read_text = self.text
            ahead = self.tokenizer.decode(self._ids(self._read), skip_special=skip)
            if ahead:  # (a window that decodes to nothing, a skipped special token, is no anchor)
                self._prefix, self._prefix_text = self._read, ahead
            else:
                self._prefix_text = new
            self._read = len(self._seed) + len(self.output)

    def _ids(self, start: int) -> list[int]:
        """The ids from `start` on, counted in the seed followed by the output."""
        s = len(self._seed)
        return self._seed[start:] + self.output if start < s else self.output[start - s:]

    def chunk(self) -> StreamChunk | None:
        """What is new since the last chunk (text held back while a stop string could be forming)."""
        new_tokens = self.output[self.sent_tokens:]
        text = ""
        if self.text is not None:
            visible = self.text
            if not self.finished:
                # an incomplete UTF-8 sequence waits for the rest; then the last characters wait
                # while a stop string could be forming (in this order: the replacement characters
                # are not characters a stop string could start with)
                visible = visible.rstrip("\ufffd")
                if self.holdback:
                    visible = visible[: max(0, len(visible) - self.holdback)]
            if len(visible) > self.sent_text:
                text = visible[self.sent_text:]
                self.sent_text = len(visible)
        if not new_tokens and not text and not self.finished:
            return None
        lps = self.logprobs[self.sent_tokens:] if self.logprobs is not None else None
        tops = self.top_logprobs[self.sent_tokens:] if self.top_logprobs is not None else None
        self.sent_tokens = len(self.output)
        return StreamChunk(self.index, new_tokens, text, lps, self.finish_reason, self.stop_reason, tops)

    def result(self) -> GenerationResult:
        return GenerationResult(list(self.prompt), list(self.output), self.text, self.finish_reason or "length",
                                self.stop_reason, self.logprobs, self.top_logprobs)


# ---- the engine ---------------------------------------------------------------------------------

class Engine:
    """Generation on one `DeepseekV3ForCausalLM` (the same model object training uses).

    model: a model object, a preset name, a model directory (Hugging Face layout, FP8 included) or
    a Hub id. tokenizer: "auto" (the directory's tokenizer.json, if any), None, a path, or an object
    with encode/decode/eos_id. fast: use oneDNN-prepacked weights on CPU (see fastpath.py).
    compile: compile each decode step whole with torch.compile (see compiled.py, docs/engine.md).
    cuda_graphs: replay each decode step as a recorded CUDA graph (see cudagraph.py); default: on
    when the model is on a CUDA device. It takes precedence over `compile` there.
    """

    def __init__(self, model: DeepseekV3ForCausalLM | str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, tokenizer="auto", fast: bool = True,
                 compile: bool = False, seed: int | None = None, max_context: int | None = None,
                 keep_fp8: bool = False, cuda_graphs: bool | None = None,
                 chat_template: str | os.PathLike | None = None) -> None:
        self.model_dir: Path | None = None
        if device is not None:
            _check_device(device)
        if isinstance(model, DeepseekV3ForCausalLM):
            if keep_fp8:
                raise SamplingError("keep_fp8 applies when the engine loads the model; for a model object use "
                                    "nanoseek.load_model(path, keep_fp8=True)")
            self.model = model
            if dtype is not None or device is not None:
                from ..checkpoint import parse_dtype

                self.model.to(device=device, dtype=parse_dtype(dtype))
        else:
            from ..checkpoint import load_model, resolve_model_dir
            from ..config import PRESETS

            name = str(model)
            if not (name in PRESETS and not Path(name).exists()):
                self.model_dir = resolve_model_dir(name)
                model = self.model_dir
            self.model = load_model(model, dtype=dtype, device=device or "cpu", keep_fp8=keep_fp8)
        self.model.eval()
        self.config = self.model.config
        p = self.model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        # The latent cache's dtype. (An fp32 cache for bf16 models on CPU, read by the fp32 attention
        # core without a per-step conversion, was tried: at 4096 tokens decode got ~20% slower,
        # reading twice the bytes costs more than converting a bf16 slice into cache-hot fp32.)
        self.cache_dtype = self.dtype
        if max_context is not None and (not _is_int(max_context) or max_context < 2):
            raise SamplingError(f"max_context must be an integer >= 2 (a prompt token and one to generate), "
                                f"got {max_context!r}")
        self.max_context = min(max_context or self.config.max_position_embeddings, self.config.max_position_embeddings)
        self.tokenizer = self._load_tokenizer(tokenizer)
        if chat_template is not None:
            self._use_chat_template(chat_template)
        eos = self.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        tok_eos = getattr(self.tokenizer, "eos_id", None)
        if tok_eos is not None:
            self.eos_ids.add(int(tok_eos))
        self._rng = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(6), "little"))
        from .fastpath import PackedModel, unpack

        unpack(self.model)  # one model, one fast path: the newest engine's choice wins
        self.packed = PackedModel(self.model) if fast and self.device.type == "cpu" else None
        self.compiled = None
        if compile:
            from .compiled import CompiledDecode

            self.compiled = CompiledDecode(self.model)
        from .cudagraph import CudaGraphDecode

        if cuda_graphs and not CudaGraphDecode.available(self.device):
            raise SamplingError(f"cuda_graphs needs the model on a CUDA device; it is on {self.device}")
        want_graphs = CudaGraphDecode.available(self.device) if cuda_graphs is None else cuda_graphs
        self.graphs = CudaGraphDecode(self.model) if want_graphs else None
        self.last_stats = GenerationStats()

    # -- tokenizer ------------------------------------------------------------------------------
    def _use_chat_template(self, path: str | os.PathLike) -> None:
        """Render chat prompts with the jinja template in file `path` instead of the model's own (one
        that lists the tools for the model, for example: DeepSeek-V3's own template does not)."""
        if self.tokenizer is None or not hasattr(self.tokenizer, "set_chat_template"):
            raise SamplingError("chat_template needs the model's tokenizer, and there is none")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SamplingError(f"cannot read the chat template {path}: {e}") from None
        try:
            self.tokenizer.set_chat_template(text, source=str(path))
        except ValueError as e:
            raise SamplingError(str(e)) from None

    def _load_tokenizer(self, tokenizer):
        if tokenizer is None or (tokenizer == "auto" and self.model_dir is None):
            return None
        if isinstance(tokenizer, (str, os.PathLike)):
            path = self.model_dir if tokenizer == "auto" else Path(tokenizer)
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.exists():
                if tokenizer == "auto":
                    return None
                raise FileNotFoundError(f"no tokenizer at {path}")
            try:
                from ..tokenizer import Tokenizer
            except ImportError as e:  # the tokenizer module is another feature; token ids still work
                raise ImportError(f"{file} exists but nanoseek.tokenizer is not available: {e}") from e
            return Tokenizer.from_file(path)
        return tokenizer

    def encode(self, prompt: Prompt, add_bos: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SamplingError("a string prompt needs a tokenizer, and this model has none (no tokenizer.json "
                                    "in its directory): pass token ids (`nanoseek generate --ids`), or a "
                                    "tokenizer (`--tokenizer PATH`, `Engine(..., tokenizer=PATH)`)")
            _check_unicode(prompt)
            ids = list(self.tokenizer.encode(prompt, add_bos=add_bos and getattr(self.tokenizer, "bos_id", None)
                                             is not None))
            source = _FROM_TOKENIZER
        else:
            if _is_array(prompt):
                prompt = prompt.tolist()
            if not isinstance(prompt, Sequence) or not all(_is_int(i) for i in prompt):
                raise SamplingError("a prompt must be a string or a sequence of integer token ids, got "
                                    f"{type(prompt).__name__} {str(prompt)[:80]}")
            ids = [int(i) for i in prompt]
            source = "token ids must be in"
        return self._in_vocabulary(ids, source)

    def _in_vocabulary(self, ids: list[int], source: str) -> list[int]:
        V = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise SamplingError(f"{source} [0, {V}) (the model's vocabulary); got {bad[:5]}")
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        if self.tokenizer is None:
            raise SamplingError("decoding text needs a tokenizer, and this model has none")
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    # -- public API -------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, speculative: bool | int = False, **kwargs) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns one result) or a list of prompts (returns a list).

        A prompt is a string (needs a tokenizer; BOS is added when the tokenizer has one) or a list of
        token ids. `params` is one SamplingParams for all, or one per prompt; keyword arguments
        (max_tokens=, temperature=, top_p=, ...) override it. speculative: True or k >= 1 drafts per
        step with the MTP module (k > number of MTP modules chains the module on itself).
        """
        single, reqs = self._requests(prompts, params, kwargs)
        for _ in self._run(reqs, self._spec_k(speculative)):
            pass
        results = [r.result() for r in reqs]
        return results[0] if single else results

    def stream(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, speculative: bool | int = False, **kwargs) -> Iterator[StreamChunk]:
        """Like generate, but yields StreamChunks as tokens are produced (`index` tells the prompt)."""
        _, reqs = self._requests(prompts, params, kwargs)
        for step in self._run(reqs, self._spec_k(speculative)):
            yield from step

    def chat(self, messages: list[dict], params: SamplingParams | None = None, *, stream: bool = False,
             speculative: bool | int = False, thinking: bool = False, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
             continue_final_message: bool = False, **kwargs):
        """One assistant turn for a list of {"role", "content"} messages, with the model's chat template
        (`tools`: OpenAI function definitions, for a template that renders them; `tool_choice`
        "required" or {"type": "function", "function": {"name": ...}} forces calls, see toolcalls.py).
        continue_final_message=True: the last message is the start of the assistant's answer, which the
        model goes on writing (DeepSeek's chat prefix completion); the result holds the rest only."""
        json_answer = bool(kwargs.get("json_object") or kwargs.get("json_schema") is not None)
        rule = self.tool_call_rule(tools or [], tool_choice, parallel_tool_calls, json_answer=json_answer)
        if rule is not None and not rule.optional and thinking:
            raise SamplingError("tool_choice 'required' or a named function cannot be combined with thinking "
                                "(the call is forced from the first token)")
        if rule is not None:
            kwargs["tool_call"] = rule
        ids = self.chat_prompt(messages, thinking=thinking, tools=tools, continue_final_message=continue_final_message)
        if stream:
            return self.stream([ids], params, speculative=speculative, **kwargs)
        return self.generate([ids], params, speculative=speculative, **kwargs)[0]

    def chat_prompt(self, messages: list[dict], thinking: bool = False, tools: list[dict] | None = None,
                    continue_final_message: bool = False, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a chat: its messages, then the opening of the assistant's turn (unless
        add_generation_prompt=False), or, with continue_final_message, the last (assistant) message
        left open."""
        messages, gen, more = self._chat_inputs(messages, tools, continue_final_message, add_generation_prompt)
        if not hasattr(self.tokenizer, "chat_ids"):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=gen, thinking=thinking, **more)
            return self.encode(text, add_bos=False)
        from ..tokenizer import iter_strings

        for text in iter_strings([messages, tools]):
            _check_unicode(text)
        # the model's own template; message content is text: special tokens written in it do not
        # become turns (as OpenAI's API)
        ids = self.tokenizer.chat_ids(messages, add_generation_prompt=gen, thinking=thinking, literal=True, tools=tools,
                                      continue_final_message=continue_final_message)
        return self._in_vocabulary(ids, _FROM_TOKENIZER)

    def chat_text(self, messages: list[dict], thinking: bool = False, tools: list[dict] | None = None,
                  continue_final_message: bool = False, add_generation_prompt: bool = True) -> str:
        """The text `chat_prompt` encodes (control tokens written in messages not yet told apart)."""
        messages, gen, more = self._chat_inputs(messages, tools, continue_final_message, add_generation_prompt)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=gen, thinking=thinking, **more)

    def _chat_inputs(self, messages: list[dict], tools: list[dict] | None, continue_final_message: bool,
                     add_generation_prompt: bool) -> tuple[list[dict], bool, dict]:
        if self.tokenizer is None or not hasattr(self.tokenizer, "apply_chat_template"):
            raise SamplingError("chat needs a tokenizer with a chat template")
        more = {"tools": tools} if tools else {}
        if continue_final_message:
            more["continue_final_message"] = True
            if messages and isinstance(messages[-1], dict):  # DeepSeek's flag, which V3.1's template reads
                messages = [*messages[:-1], {**messages[-1], "prefix": True}]
        return messages, add_generation_prompt and not continue_final_message, more

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """Prompt ids that ask the model for the text between `prefix` and `suffix` (DeepSeek's
        fill-in-the-middle format; the tokenizer must have its FIM tokens)."""
        if self.tokenizer is None or not hasattr(self.tokenizer, "fim_ids"):
            raise SamplingError("fill-in-the-middle needs the model's tokenizer")
        for text in (prefix, suffix):
            if not isinstance(text, str):
                raise SamplingError(f"fill-in-the-middle takes text, got {type(text).__name__}")
            _check_unicode(text)
        try:
            ids = self.tokenizer.fim_ids(prefix, suffix)
        except ValueError as e:
            raise SamplingError(str(e)) from None
        return self._in_vocabulary(ids, _FROM_TOKENIZER)

    def warm_up(self, max_batch: int = 8, speculative: int = 0) -> int:
        """With `compile=True`: compile every decode-step shape now rather than at the first request
        that needs it (a server calls this before it accepts requests). Each row-count bucket of
        the compiled step (1, 2, 3-4, 5-8 rows) with one shared and with per-row positions, plus the
        speculative shapes when `speculative` > 0 (greedy, one fused graph, and sampled). Returns
        how many generate calls it made (0 without compile). Takes minutes on a small CPU the first
        time; Inductor's disk cache makes later starts faster."""
        if self.compiled is None or self.graphs is not None:  # CUDA graphs record in milliseconds
            return 0
        from ..model.moe import Experts

        calls = 0
        for b in Experts.TRACED_SLOTS:
            if b > max_batch:
                break
            same = [[1 + i, 2, 3, 4] for i in range(b)]
            mixed = [[1 + i] * (2 + i) for i in range(b)]
            for prompts in ((same, mixed) if b > 1 else (same,)):
                for k in sorted({0, speculative}):
                    self.generate(prompts, max_tokens=6, temperature=0, ignore_eos=True, speculative=k)
                    calls += 1
                    if k:  # greedy speculation runs one fused graph; sampled rows its separate steps
                        self.generate(prompts, max_tokens=6, temperature=1.0, seed=0, ignore_eos=True, speculative=k)
                        calls += 1
        return calls

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Prompt, top: int = 0,
                        chunk: int = 512) -> tuple[list[int], list[float | None], list[dict[int, float] | None]]:
        """Score a prompt: (its token ids, the logprob of each token given the ones before it, and the
        `top` most likely tokens at each position), under the raw model distribution, as generate's
        logprobs; the first token has None for both. What loglikelihood evaluation and OpenAI's
        `echo` + `logprobs` need. One forward; the head runs `chunk` positions at a time, so a long
        prompt never holds a [length, vocab] matrix."""
        ids = self.encode(prompt)
        if not ids:
            raise SamplingError("the prompt is empty")
        if len(ids) > self.max_context:
            raise SamplingError(f"the prompt has {len(ids)} tokens; the context holds {self.max_context}")
        if not _is_int(top) or not 0 <= top <= self.config.vocab_size:
            raise SamplingError(f"top must be an integer in [0, {self.config.vocab_size}], got {top!r}")
        self._refresh()
        x = torch.tensor([ids], device=self.device)
        # logits_at a single position: the forward returns every hidden state and skips the full head
        h = self.model(x, return_hidden=True, logits_at=torch.zeros(1, dtype=torch.long, device=self.device))
        h = h.hidden_states[0]
        lps: list[float | None] = [None]
        tops: list[dict[int, float] | None] = [None]
        for a in range(0, len(ids) - 1, chunk):
            b = min(a + chunk, len(ids) - 1)
            chosen, top_d = raw_logprobs(self.model.lm_head(h[a:b]), x[0, a + 1:b + 1], top)
            lps += chosen.tolist()
            tops += top_d if top_d is not None else [{} for _ in range(b - a)]
        return ids, lps, tops

    def kv_cache_bytes_per_token(self, speculative: bool = False) -> int:
        """Latent cache bytes per token: layers x (kv_lora_rank + qk_rope_head_dim) x element size."""
        n = self.config.num_hidden_layers + (1 if speculative else 0)
        return n * self.config.kv_cache_dim * torch.empty(0, dtype=self.cache_dtype).element_size()

    # -- internals --------------------------------------------------------------------------------
    def _spec_k(self, speculative: bool | int) -> int:
        if not isinstance(speculative, (bool, int)) or speculative < 0:  # 2.7 drafts or "2" are mistakes, not 2
            raise SamplingError(f"speculative must be True/False or a number of drafts >= 1, got {speculative!r}")
        k = int(speculative)
        if k and self.config.num_nextn_predict_layers < 1:
            raise SamplingError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1); "
                                "this model has none")
        return k

    def _requests(self, prompts, params, kwargs) -> tuple[bool, list[_Request]]:
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and len(prompts) > 0
                                               and all(_is_int(i) for i in prompts))
        if _is_array(prompts):
            single, prompts = prompts.ndim == 1, prompts.tolist()
            if single:
                prompts = [prompts]
        elif single:
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise SamplingError("prompts must be a string, a list of token ids, or a non-empty list of those")
        if params is None or isinstance(params, SamplingParams):
            plist = [make_params(params, **kwargs)] * len(prompts)
        else:
            if len(params) != len(prompts):
                raise SamplingError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
            plist = [make_params(p, **kwargs) for p in params]
        reqs = []
        V = self.config.vocab_size
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            if p.logprobs is not None and p.logprobs > V:
                raise SamplingError(f"logprobs={p.logprobs} asks for more alternatives than the vocabulary has ({V})")
            if p.stop_strings and self.tokenizer is None:
                raise SamplingError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
            if p.constrained and not hasattr(self.tokenizer, "token_bytes"):
                raise SamplingError("constrained decoding (JSON mode, forced tool calls) needs the model's tokenizer")
            outside = [t for t in (p.logit_bias or {}) if t >= V]
            if outside:
                raise SamplingError(f"logit_bias names token {outside[0]}, outside the vocabulary (size {V})")
            ids = self.encode(prompt)
            if not ids:
                raise SamplingError(f"prompt {i} is empty")
            if len(ids) >= self.max_context:
                raise SamplingError(f"prompt {i} has {len(ids)} tokens; the context holds {self.max_context} "
                                    "(max_position_embeddings), so nothing could be generated: shorten it")
            reqs.append(_Request(i, ids, p, self.eos_ids, self.tokenizer, self.max_context))
        return single, reqs

    def _constraints(self, reqs: list[_Request]) -> list[TokenConstraint | None] | None:
        """Constrained rows' state (None for free rows; None for all when no row asks): JSON mode, or
        forced tool calls. Once the object or the calls are closed, a row's stop tokens are the only
        ones allowed."""
        if not any(r.params.constrained for r in reqs):
            return None
        table = self.tokenizer.token_bytes()

        def one(p: SamplingParams, stop: set[int]) -> TokenConstraint | None:
            if not p.constrained:
                return None
            json = lambda: JsonConstraint(table, stop, *([p.schema_node] if p.schema_node else []))  # noqa: E731
            if p.tool_call is None:
                return json()
            calls = ToolCallConstraint(table, stop, self._tool_markers(), p.tool_call, p.tool_schemas)
            return EitherConstraint([json(), calls]) if p.tool_call.optional else calls

        return [one(r.params, r.stop_ids or self.eos_ids) for r in reqs]

    def _tool_markers(self) -> dict[str, int]:
        try:
            return marker_ids(self.tokenizer)
        except ValueError as e:
            raise SamplingError(str(e)) from None

    def tool_call_markup(self, tools: list[dict] | None = None) -> str | None:
        """The tool-call markup the chat template writes ("v3" for V3/R1, "v3.1"), or None where it
        writes none this engine can force (toolcalls.py). `tools`: the request's (they pick a named
        `tool_use` template, as for the prompt)."""
        if self.tokenizer is None or not hasattr(self.tokenizer, "apply_chat_template"):
            return None
        return markup_of(lambda msgs: self.tokenizer.apply_chat_template(msgs, add_generation_prompt=False,
                                                                         tools=tools or []))

    def tool_call_rule(self, tools: list[dict], tool_choice, parallel: bool = True,
                       json_answer: bool = False) -> ToolCallRule | None:
        """The rule that forces OpenAI's `tool_choice` ("required" or {"type": "function", "function":
        {"name": ...}}) over `tools`, in the template's markup. None for "none", and for "auto" unless
        the answer is JSON (`json_answer`): then an optional rule (`optional=True`) lets the answer be
        tool calls (checked as forced ones are) or the JSON; None (JSON only) where the template
        writes no tool calls."""
        try:
            rule = rule_for(tools or [], tool_choice, "v3", parallel)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SamplingError(f"tool_choice: {e}") from None
        if rule is None:
            if not (json_answer and tools and tool_choice != "none"):
                return None
            try:
                return replace(self.tool_call_rule(tools, "required", parallel), optional=True)
            except SamplingError:
                return None
        markup = self.tool_call_markup(tools)
        if markup is None:
            raise SamplingError("tool_choice 'required' or a named function needs a chat template that writes tool "
                                "calls in DeepSeek's V3/R1 or V3.1 markup (this model's does not; see --chat-template)")
        self._tool_markers()
        return replace(rule, markup=markup)

    def _generators(self, reqs: list[_Request]) -> list[torch.Generator | None]:
        return [torch.Generator(device=self.device).manual_seed(r.params.seed) if r.params.seed is not None else None
                for r in reqs]

    @torch.inference_mode()
    def _run(self, reqs: list[_Request], k: int) -> Iterator[list[StreamChunk]]:
        model, cfg = self.model, self.config
        stats = self.last_stats = GenerationStats(speculative=k)
        self._refresh()
        done = [r.chunk() for r in reqs if r.finished]  # max_tokens 0
        if done:
            yield [c for c in done if c is not None]
        live = [r for r in reqs if not r.finished]
        if not live:
            return
        shared = torch.Generator(device=self.device).manual_seed(int(torch.randint(0, 2**62, (), generator=self._rng)))
        if k and any(r.params.constrained for r in live):
            raise SamplingError("constrained decoding (JSON mode, forced tool calls) does not combine with "
                                "speculative decoding")
        proc = LogitsProcessor([r.params for r in live], [r.prompt for r in live], cfg.vocab_size, self.device,
                               self._generators(live), shared, self._constraints(live))
        want_lp = max((r.params.logprobs for r in live if r.params.logprobs is not None), default=None)
        lens = [len(r.prompt) for r in live]
        B = len(live)
        max_len = max(n + r.max_tokens for n, r in zip(lens, live)) + 2 * k + 2
        n_layers = cfg.num_hidden_layers + (1 if k else 0)
        cache = LatentCache(cfg, B, max_len, n_layers=n_layers, dtype=self.cache_dtype, device=self.device)
        ids = right_padded([r.prompt for r in live], self.device)
        n = torch.tensor(lens, device=self.device)
        stats.prompt_tokens = sum(lens)

        # -- prefill -------------------------------------------------------------------------
        t0 = time.perf_counter()
        out = model(ids, cache=cache, return_hidden=bool(k), logits_at=n - 1)
        logits = out.logits
        tok = proc.sample(logits)
        self._emit(live, proc, tok[:, None], torch.zeros(B, dtype=torch.long, device=self.device), logits[:, None],
                   want_lp, stats, first=True)
        drafts, q = self._prefill_drafts(proc, ids, n, tok, out.hidden_states, cache, k, lens) if k else (None, None)
        stats.prefill_s = time.perf_counter() - t0
        last = tok
        yield [c for c in (r.chunk() for r in live) if c is not None]

        # -- decode --------------------------------------------------------------------------
        t0 = time.perf_counter()
        while True:
            keep = [b for b, r in enumerate(live) if not r.finished]
            if not keep:
                break
            if len(keep) < len(live):
                idx = torch.tensor(keep, device=self.device)
                cache.layers = [layer.index_select(0, idx) for layer in cache.layers]
                proc.select(keep)
                live = [live[b] for b in keep]
                n, last = n[idx], last[idx]
                if k:
                    drafts = drafts[idx]
                    q = q[idx] if q is not None else None
            B = len(live)
            stats.decode_forwards += 1
            stats.row_steps += B
            if not k:
                n, last = self._plain_step(live, proc, last, n, cache, want_lp, stats)
            else:
                n, last, drafts, q = self._verify_step(live, proc, last, drafts, q, n, cache, k, want_lp, stats)
            yield [c for c in (r.chunk() for r in live) if c is not None]
        stats.decode_s = time.perf_counter() - t0

    def _refresh(self) -> None:
        """Bring the fast paths in line with the model's weights now (they may have been trained or
        replaced since the last call): the CPU's prepacked copies, the GPU's recorded graphs."""
        if self.packed is not None:
            self.packed.refresh()
        if self.graphs is not None:
            self.graphs.refresh()

    def _forward(self, ids: torch.Tensor, start_pos: int | torch.Tensor, cache: LatentCache,
                 hidden: bool = False, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, final hidden states or None) of a decode-time forward: a CUDA graph or compiled
        when it can be."""
        if self.graphs is not None:
            out = self.graphs.forward(ids, start_pos, cache, end)
            if out is not None:
                return out
        if self.compiled is not None and self.compiled.usable(ids):
            out = self.compiled.forward(ids, start_pos, cache)
            if out is not None:
                return out
        out = self.model(ids, start_pos=start_pos, cache=cache, return_hidden=hidden)
        return out.logits, out.hidden_states

    def _mtp_step(self, next_tokens: torch.Tensor, hidden: torch.Tensor, start_pos: int | torch.Tensor,
                  cache: LatentCache, logits_at: torch.Tensor | None = None,
                  end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`model.mtp_step(0, ...)` at decode time: a CUDA graph or compiled when it can be."""
        if self.graphs is not None:
            out = self.graphs.mtp_step(next_tokens, hidden.contiguous(), start_pos, cache, end)
            if out is not None:
                return out[0], gather_positions(out[1], logits_at)
        if self.compiled is not None and self.compiled.usable(next_tokens):
            # contiguous: a sliced `hidden` would make the compiled graph's stride guards recompile
            out = self.compiled.mtp_step(next_tokens, hidden.contiguous(), start_pos, cache)
            if out is not None:
                return out[0], gather_positions(out[1], logits_at)
        return self.model.mtp_step(0, next_tokens, hidden, start_pos=start_pos, cache=cache, logits_at=logits_at)

    def _plain_step(self, live: list, proc: LogitsProcessor, last: torch.Tensor, n: torch.Tensor,
                    cache: LatentCache, want_lp: bool, stats: GenerationStats) -> tuple[torch.Tensor, torch.Tensor]:
        """One ordinary decode step for every live row; returns the new (n, last)."""
        host = _host_positions(live, n)
        logits = self._forward(last[:, None], _start(n, host), cache, end=max(host) + 1)[0][:, -1]
        tok = proc.sample(logits)
        zeros = torch.zeros(len(live), dtype=torch.long, device=self.device)
        self._emit(live, proc, tok[:, None], zeros, logits[:, None], want_lp, stats)
        return n + 1, tok

    def _verify_step(self, live: list, proc: LogitsProcessor, last: torch.Tensor, drafts: torch.Tensor,
                     q: torch.Tensor | None, n: torch.Tensor, cache: LatentCache, k: int, want_lp: bool,
                     stats: GenerationStats):
        """One speculative step: verify `last` + k drafts in one forward, emit the accepted tokens,
        then draft the next k from the MTP module. Returns the new (n, last, drafts, q)."""
        B = len(live)
        host = _host_positions(live, n)
        start, end = _start(n, host), max(host) + k + 1
        fused = None
        if proc.plain_argmax:
            if self.graphs is not None:
                fused = self.graphs.greedy_verify(last, drafts, start, cache, end)
            if fused is None and self.compiled is not None and self.compiled.usable(B * (k + 1)):
                fused = self.compiled.greedy_verify(last, drafts, start, cache)
        if fused is not None:  # verification, acceptance and the MTP step in one graph
            logits, toks, n_acc, h_last, mtp_logits = fused
        else:
            logits, hidden = self._forward(torch.cat((last[:, None], drafts), dim=1), start, cache, hidden=True, end=end)
            n_acc, toks = speculative_accept(logits, drafts, q, proc)
        stats.drafted += B * k
        counts = self._emit(live, proc, toks, n_acc, logits, want_lp, stats)
        stats.accepted += sum(counts) - B  # from the host copy: no second wait for the device
        new_last = toks.gather(1, n_acc[:, None])[:, 0]
        if fused is None:
            A = int(n_acc.max()) + 1
            nt = mtp_next_tokens(drafts, n_acc, new_last)[:, :A]
            h_mtp, mtp_logits = self._mtp_step(nt, hidden[:, :A], start, cache, logits_at=n_acc, end=max(host) + A)
            h_last = take(h_mtp, n_acc[:, None])
        n = n + n_acc + 1
        # finished rows' positions may lag (tokens past a stop are dropped): harmless, they leave
        # the batch before the next step, and only their own drafts read them
        drafts, q = self._draft(proc, h_last, mtp_logits, n, cache, k, [r.position for r in live])
        return n, new_last, drafts, q

    def _prefill_drafts(self, proc: LogitsProcessor, ids: torch.Tensor, n: torch.Tensor, tok: torch.Tensor,
                        hidden: torch.Tensor, cache: LatentCache, k: int,
                        lens: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """After a prefill of right-padded `ids` (row lengths n, first sampled tokens `tok`): fill the
        MTP module's cache over the prompts and draft k tokens from its output at each row's last
        position. Position i reads the token at i + 1, which at a row's last position is `tok`."""
        nxt = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
        nxt[torch.arange(ids.shape[0], device=ids.device), n - 1] = tok
        h_mtp, mtp_logits = self.model.mtp_step(0, nxt, hidden, start_pos=0, cache=cache, logits_at=n - 1)
        return self._draft(proc, take(h_mtp, (n - 1)[:, None]), mtp_logits, n, cache, k, lens)

    def _draft(self, proc: LogitsProcessor, h_last: torch.Tensor, mtp_logits: torch.Tensor, n_next: torch.Tensor,
               cache: LatentCache, k: int, host: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k drafts per row: the first from `mtp_logits` (the MTP output at position n_next - 1); each
        next one from the MTP module run on its own output and the previous draft at n_next + j.
        `host`: n_next as a host-side list."""
        drafts, qs = [], []
        logits = mtp_logits
        h = h_last
        for j in range(k):
            if proc.all_greedy:
                d = proc.penalized(logits.float()).argmax(dim=-1)
            else:
                qj = proc.probs(logits.float())
                d = proc.draw(qj)
                qs.append(qj)
            drafts.append(d)
            if j + 1 < k:
                h, logits = self._mtp_step(d[:, None], h, _start(n_next + j, [p + j for p in host]), cache,
                                           end=max(host) + j + 1)
                logits = logits[:, -1]
        q = torch.stack(qs, dim=1) if qs else None
        return torch.stack(drafts, dim=1), q

    def _emit(self, live: list[_Request], proc: LogitsProcessor, toks: torch.Tensor, n_acc: torch.Tensor,
              logits: torch.Tensor, want_lp: int | None, stats: GenerationStats, first: bool = False) -> list[int]:
        """Give each row its new tokens toks[b, :n_acc[b] + 1] (logits[b, i] produced toks[b, i]).
        Returns n_acc + 1 per row, read once from the device."""
        counts = (n_acc + 1).tolist()
        toks_l = toks.tolist()
        lps = tops = None
        if want_lp is not None:
            K = toks.shape[1]
            flat_logits = logits[:, :K].reshape(-1, logits.shape[-1])
            chosen, top = raw_logprobs(flat_logits, toks.clamp(min=0).reshape(-1), want_lp)
            lps = chosen.view(len(live), K).tolist()
            tops = [top[b * K:(b + 1) * K] for b in range(len(live))] if top is not None else None
        committed = [[-1] * len(toks_l[0]) for _ in toks_l] if proc.counts is not None else None
        for b, r in enumerate(live):
            for i in range(counts[b]):
                before = len(r.output)
                r.add(toks_l[b][i], lps[b][i] if lps else None, tops[b][i] if tops else None)
                if len(r.output) > before:
                    if committed is not None:
                        committed[b][i] = toks_l[b][i]
                    stats.generated_tokens += 1
                    if not first:
                        stats.decode_tokens += 1
                if r.finished:
                    break
        if committed is not None:  # penalties count what was emitted
            proc.update(torch.tensor(committed, device=toks.device))
        return counts


_FROM_TOKENIZER = "the tokenizer gave ids outside the model's vocabulary"


def _check_device(device: str | torch.device) -> None:
    """A device this machine has, or a SamplingError saying why not (before any loading)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SamplingError(f"unknown device {device!r} ({e})") from None
    from ..devices import device_unavailable

    reason = device_unavailable(dev)
    if reason:
        raise SamplingError(f"device {device!r}: {reason}")


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone UTF-16 surrogate (e.g. from JSON "\ud800")
        raise SamplingError(f"the prompt is not valid Unicode: {e.reason} at character {e.start}") from None


def _is_array(x) -> bool:
    """A torch tensor or a numpy array (token ids)."""
    return isinstance(x, torch.Tensor) or (hasattr(x, "ndim") and hasattr(x, "tolist") and not isinstance(x, (str, bytes)))


def right_padded(rows: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """Token-id rows as one LongTensor [len(rows), longest], zeros after each row's end."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def _is_int(x) -> bool:
    """A token id: any integer type (numpy's included), not a bool or a float."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


# Tests set this: every step then checks the host-side positions against the device's.
CHECK_POSITIONS = False


def _host_positions(live: list[_Request], n: torch.Tensor) -> list[int]:
    """The live rows' positions n [B], known on the host (see _Request.position): reading n back
    would make the host wait for the device at every step."""
    host = [r.position for r in live]
    if CHECK_POSITIONS and n.tolist() != host:
        raise AssertionError(f"host positions {host} != device positions {n.tolist()}")
    return host


def _start(n: torch.Tensor, host: list[int]) -> int | torch.Tensor:
    """The start_pos for a forward of rows at positions n [B] (`host`: the same on the host): an int
    when all rows agree (always at batch 1), which lets attention slice the cache and skip per-row
    masks, else the tensor."""
    if all(p == host[0] for p in host):
        return host[0]
    return n
