"""Sampling parameters and the logits -> next-token pipeline, as functions of tensors.

For each row of a batch, in this order (the order vLLM and transformers use):

0. logit bias (OpenAI's `logit_bias`): a fixed amount added to chosen tokens' logits (-100
   bans a token in practice, +100 all but forces it);
1. repetition penalty (transformers' rule, over prompt + output tokens): a seen token's logit l
   becomes l / r if l > 0, else l * r;
2. presence and frequency penalties (OpenAI's rule, over output tokens only):
   l -= presence * [count > 0] + frequency * count;
3. temperature 0 means greedy (argmax of the penalized logits); otherwise l / temperature
   (below GREEDY_BELOW, 1e-5, also greedy: dividing by such a temperature overflows fp32, and the
   distribution it asks for is the argmax anyway, as in vLLM);
4. top-k, then top-p (smallest set of tokens whose probability reaches p; at least one kept),
   then min-p (drop tokens below min_p x the most likely token's probability);
5. a draw from the resulting distribution with the row's own `torch.Generator`, so a seeded row
   gives the same tokens whether it runs alone or in a batch;
6. JSON mode (`json_object`, `json_schema`): a token that cannot continue a JSON object (one the
   schema accepts) is replaced by the likeliest allowed one (greedy) or drawn again without it
   (sampled), see constraints.py.

Reported logprobs are those of the raw model distribution (log_softmax of the unprocessed logits),
as vLLM reports them by default: they do not depend on the sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .constraints import Node, SchemaError, TokenConstraint, compile_schema
from .toolcalls import ToolCallRule


class SamplingError(ValueError):
    """Sampling parameters out of range or of the wrong type."""


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    json_object: bool = False  # the output is one JSON object (needs a tokenizer; not with speculation)
    json_schema: dict | None = None  # ... one that this JSON Schema accepts (constraints.py lists the keywords)
    tool_call: ToolCallRule | None = None  # the output is forced tool calls (toolcalls.py; tool_choice "required")
    skip_special_tokens: bool = True
    stop_strings: list[str] = field(init=False, default_factory=list, repr=False)
    schema_node: Node | None = field(init=False, default=None, repr=False, compare=False)  # json_schema, compiled
    tool_schemas: dict | None = field(init=False, default=None, repr=False, compare=False)  # tool_call's, compiled

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplingParams":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SamplingError(msg)

        def number(name: str) -> float:
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool), f"{name} must be a number, got {v!r}")
            return float(v)

        need(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool),
             f"max_tokens must be an integer, got {self.max_tokens!r}")
        need(self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}")
        need(number("temperature") >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        need(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= -1,
             f"top_k must be an integer >= 1, or 0 / -1 to turn it off; got {self.top_k!r}")
        need(0 < number("top_p") <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= number("min_p") <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(-2 <= number("presence_penalty") <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= number("frequency_penalty") <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(number("repetition_penalty") > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        need(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                   and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"seed must be None or an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                       and self.logprobs >= 0),
             f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        stop = self.stop
        if stop is None:
            self.stop_strings = []
        elif isinstance(stop, str):
            self.stop_strings = [stop] if stop else []
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            self.stop_strings = [s for s in stop if s]
        else:
            raise SamplingError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}"
                                " (token ids go in stop_token_ids)")
        need(isinstance(self.json_object, bool), f"json_object must be True or False, got {self.json_object!r}")
        self.schema_node = None
        if self.json_schema is not None:
            need(not self.json_object, "json_object and json_schema exclude each other (a schema says more)")
            try:
                self.schema_node = compile_schema(self.json_schema)
            except SchemaError as e:
                raise SamplingError(f"json_schema: {e}") from None
        self.tool_schemas = None
        if self.tool_call is not None:
            need(isinstance(self.tool_call, ToolCallRule), f"tool_call must be a ToolCallRule, got {self.tool_call!r}")
            json_too = self.json_object or self.json_schema is not None
            need(json_too == self.tool_call.optional,
                 "tool_call excludes json_object and json_schema (the arguments follow each function's schema), "
                 "unless it is optional: calls or the JSON output" if json_too else
                 "an optional tool_call goes with json_object or json_schema (calls or the JSON output)")
            try:
                self.tool_schemas = self.tool_call.compile()
            except SchemaError as e:
                raise SamplingError(f"tool_call: {e}") from None
        bias = self.logit_bias
        need(bias is None or (isinstance(bias, dict) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 and isinstance(v, (int, float))
            and not isinstance(v, bool) and -100 <= v <= 100 for i, v in bias.items())),
             f"logit_bias must map token ids >= 0 to numbers in [-100, 100], got {bias!r}")
        ids = self.stop_token_ids
        need(ids is None or (isinstance(ids, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                     and i >= 0 for i in ids)),
             f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def constrained(self) -> bool:
        """Is the output constrained (json_object, json_schema or tool_call)?"""
        return self.json_object or self.json_schema is not None or self.tool_call is not None

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def make_params(params: SamplingParams | None = None, **kwargs) -> SamplingParams:
    """SamplingParams from an instance and/or keyword overrides (unknown keywords are an error)."""
    known = {name for name, f in SamplingParams.__dataclass_fields__.items() if f.init}
    unknown = set(kwargs) - known
    if unknown:
        raise SamplingError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    if params is None:
        return SamplingParams(**kwargs)
    if not isinstance(params, SamplingParams):
        raise SamplingError(f"expected SamplingParams, got {type(params).__name__}")
    # validated again: fields may have been assigned since construction (stop strings derive from stop)
    return replace(params, **kwargs) if kwargs else params.validate()


class LogitsProcessor:
    """Per-row sampling state for a batch: parameters as tensors, token counts, generators."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str, generators: Sequence[torch.Generator | None] | None = None,
                 shared_generator: torch.Generator | None = None,
                 constraints: Sequence[TokenConstraint | None] | None = None) -> None:
        """generators: one per row (None for rows without a seed: they draw from `shared_generator`).
        constraints: one per row (None for free rows): JSON mode's state, advanced by `sample`."""
        B = len(params)
        self.params = list(params)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generators = list(generators) if generators is not None else [None] * B
        self.seeded = torch.tensor([g is not None for g in self.generators], dtype=torch.bool, device=self.device)
        self.shared_generator = shared_generator or torch.Generator(device=self.device).manual_seed(
            int(torch.randint(0, 2**62, ())))
        f32 = dict(dtype=torch.float32, device=self.device)
        self.temperature = torch.tensor([p.temperature for p in params], **f32)
        self.greedy = self.temperature < GREEDY_BELOW
        self.all_greedy = bool(self.greedy.all())
        self.top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=self.device)
        self.top_p = torch.tensor([p.top_p for p in params], **f32)
        self.min_p = torch.tensor([p.min_p for p in params], **f32)
        self.presence = torch.tensor([p.presence_penalty for p in params], **f32)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], **f32)
        self.repetition = torch.tensor([p.repetition_penalty for p in params], **f32)
        self.use_topk = any(0 < p.top_k < vocab_size for p in params)
        self.use_topp = any(p.top_p < 1 for p in params)
        self.use_minp = any(p.min_p > 0 for p in params)
        self.use_counts = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
        self.use_repetition = any(p.repetition_penalty != 1 for p in params)
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=self.device) if (
            self.use_counts or self.use_repetition) else None
        self.constraints = list(constraints) if constraints is not None and any(constraints) else None
        self.bias = None
        if any(p.logit_bias for p in params):  # (ids checked against the vocabulary by the engine)
            entries = [(b, i, float(v)) for b, p in enumerate(params) for i, v in (p.logit_bias or {}).items()]
            rows, cols, vals = zip(*entries)
            self.bias = torch.zeros(B, vocab_size, dtype=torch.float32, device=self.device)
            self.bias[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = torch.tensor(
                vals, device=self.device)
        self.prompt_mask = None
        if self.use_repetition:
            self.prompt_mask = torch.zeros(B, vocab_size, dtype=torch.bool, device=self.device)
            for b, ids in enumerate(prompts):
                ids_t = torch.tensor([i for i in ids if 0 <= i < vocab_size], dtype=torch.long, device=self.device)
                self.prompt_mask[b, ids_t] = True

    # -- state --------------------------------------------------------------------------------
    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        keep = idx.tolist()
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if self.constraints is not None:
            self.constraints = [self.constraints[i] for i in keep]
        for name in ("seeded", "temperature", "greedy", "top_k", "top_p", "min_p", "presence", "frequency", "repetition",
                     "counts", "prompt_mask", "bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[idx])
        self.all_greedy = bool(self.greedy.all()) if len(keep) else True

    def update(self, tokens: torch.Tensor) -> None:
        """Count newly emitted tokens [B] (or [B, n] with -1 for none) for the penalties."""
        if self.counts is None:
            return
        t = tokens.view(tokens.shape[0], -1)
        valid = t >= 0
        self.counts.scatter_add_(1, t.clamp(min=0), valid.float())

    # -- the pipeline ---------------------------------------------------------------------------
    @property
    def plain_argmax(self) -> bool:
        """Is every row's next token the argmax of the raw logits (greedy, no penalty, no bias, no JSON mode)?"""
        return self.all_greedy and self.counts is None and self.bias is None and self.constraints is None

    def penalized(self, logits: torch.Tensor, extra_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 0-2 on fp32 logits [B, V]; extra_counts [B, V] adds not-yet-committed tokens (drafts)."""
        if self.bias is not None:
            logits = logits + self.bias
        if self.counts is None:
            return logits
        counts = self.counts if extra_counts is None else self.counts + extra_counts
        if self.use_repetition:
            seen = self.prompt_mask | (counts > 0)
            r = self.repetition[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if self.use_counts:
            logits = logits - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0).float()
        return logits

    def probs(self, logits: torch.Tensor, extra_counts: torch.Tensor | None = None) -> torch.Tensor:
        """The sampling distribution [B, V] (fp32); greedy rows get a one-hot on the argmax."""
        logits = self.penalized(logits.float(), extra_counts)
        B, V = logits.shape
        greedy_tok = logits.argmax(dim=-1)
        onehot = torch.zeros_like(logits).scatter_(1, greedy_tok[:, None], 1.0)
        if self.all_greedy:
            return onehot
        temp = torch.where(self.greedy, torch.ones_like(self.temperature), self.temperature)
        logits = logits / temp[:, None]
        if self.use_topk or self.use_topp:
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
            if self.use_topk:
                ranks = torch.arange(V, device=logits.device)[None, :]
                sorted_logits = sorted_logits.masked_fill(ranks >= self.top_k[:, None], float("-inf"))
            if self.use_topp:
                sp = sorted_logits.softmax(dim=-1)
                before = sp.cumsum(dim=-1) - sp  # probability mass strictly before each token
                # rows at top_p = 1 keep everything: their running sum may round to >= 1 before the tail
                cut = (before >= self.top_p[:, None]) & (self.top_p < 1)[:, None]
                sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter_(1, sorted_idx, sorted_logits)
        probs = logits.softmax(dim=-1)
        if self.use_minp:
            floor = self.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return torch.where(self.greedy[:, None], onehot, probs)

    def draw(self, probs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row from probs [B, V] (need not be normalized).

        The exponential race argmax(p / E), E ~ Exp(1), draws exactly from p. Only rows in the
        bool mask `rows` (default: all) draw; greedy rows take the argmax. A seeded row uses its own
        generator, so its stream never depends on its batch neighbours; unseeded rows share one
        generator and are drawn in one vectorized call.
        """
        out = probs.argmax(dim=-1)
        if self.all_greedy:
            return out
        todo = ~self.greedy if rows is None else (rows & ~self.greedy)
        shared = todo & ~self.seeded
        if bool(shared.any()):
            noise = torch.empty_like(probs[shared]).exponential_(generator=self.shared_generator)
            out[shared] = (probs[shared] / noise).argmax(dim=-1)
        for b in (todo & self.seeded).nonzero()[:, 0].tolist():
            noise = torch.empty_like(probs[b]).exponential_(generator=self.generators[b])
            out[b] = (probs[b] / noise).argmax()
        return out

    def uniform(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """U(0, 1) per row (speculative acceptance tests); only `rows` draw, seeded ones from their own generator."""
        B = len(self.params)
        out = torch.zeros(B, device=self.device)
        todo = torch.ones(B, dtype=torch.bool, device=self.device) if rows is None else rows
        shared = todo & ~self.seeded
        n = int(shared.sum())
        if n:
            out[shared] = torch.rand(n, generator=self.shared_generator, device=self.device)
        for b in (todo & self.seeded).nonzero()[:, 0].tolist():
            out[b] = torch.rand((), generator=self.generators[b], device=self.device)
        return out

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from logits [B, V]; JSON-mode rows get an allowed token and advance."""
        if self.all_greedy:
            probs, tok = None, self.penalized(logits.float()).argmax(dim=-1)
        else:
            probs = self.probs(logits)
            tok = self.draw(probs)
        if self.constraints is not None:
            pen = self.penalized(logits.float())
            for b, c in enumerate(self.constraints):
                if c is None:
                    continue
                row_probs = None if probs is None or bool(self.greedy[b]) else probs[b]
                try:
                    t = c.choose(int(tok[b]), pen[b], row_probs, self.generators[b] or self.shared_generator)
                    c.advance(t)
                except Exception:  # noqa: BLE001 - a dead end of one row's schema must not fail the batch
                    t = int(tok[b])  # the row goes on unconstrained; its output will not validate
                    self.constraints[b] = None
                tok[b] = t
        return tok


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, list[dict[int, float]] | None]:
    """Logprob of `tokens` [B] under log_softmax(logits [B, V]), and the `top` most likely per row."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    if top <= 0:
        return chosen, None
    v, i = lp.topk(top, dim=-1)
    return chosen, [dict(zip(ii.tolist(), vv.tolist())) for ii, vv in zip(i, v)]
