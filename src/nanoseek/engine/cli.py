"""`nanoseek generate`, `nanoseek chat`, `nanoseek bench`: thin shells over `nanoseek.engine.Engine`.

MODEL is a run directory of `nanoseek train`, any Hugging Face format directory (an FP8 DeepSeek
checkpoint included), a Hub id (downloaded with huggingface_hub), or a preset name (random weights).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time


def whole_number(text: str) -> int:
    """argparse type: an integer (argparse's message names the flag)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    n = whole_number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return n


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """How the model is loaded and run; shared by generate, chat, bench and serve."""
    p.add_argument("--speculative", nargs="?", type=int, const=1, default=0, metavar="K",
                   help="MTP speculative decoding with K drafts per step (default K: 1)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or its directory) when MODEL has none")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja chat template to use instead of the model's own (e.g. one that lists the tools)")
    p.add_argument("--no-fast", action="store_true", help="plain PyTorch linears (no oneDNN prepacking)")
    p.add_argument("--keep-fp8", action="store_true",
                   help="hold the FP8-stored weights in FP8 (a third of fp32's memory; quantizes other checkpoints "
                        "on load); on CPU use it with --compile, which converts them inside the fused matmuls")
    p.add_argument("--compile", action="store_true", help="compile each decode step whole with torch.compile: "
                   "1.4-4x faster CPU decode after 20-60 s of compiling per batch shape (needs a C++ compiler)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a CUDA device, launch each decode step's kernels one by one instead of replaying "
                        "recorded CUDA graphs (the default there)")


def _sampling_flags(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="STRING", help="stop string (repeatable)")
    add_model_flags(p)


def _params(args: argparse.Namespace, **extra):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, **extra)


def _engine(args: argparse.Namespace):
    import torch

    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    return Engine(args.model, **engine_kwargs(args))


def engine_kwargs(args: argparse.Namespace) -> dict:
    """`Engine` keyword arguments from the flags `add_model_flags` adds (generate, chat, bench, serve).
    cuda_graphs: off when asked, else the engine's default (on for CUDA)."""
    return dict(dtype=args.dtype, device=args.device, fast=not args.no_fast, compile=args.compile,
                tokenizer=args.tokenizer or "auto", keep_fp8=args.keep_fp8,
                cuda_graphs=False if args.no_cuda_graphs else None, chat_template=args.chat_template)


def _errors(fn):
    def run(args: argparse.Namespace) -> int:
        from .sampling import SamplingError

        try:
            return fn(args)
        except (SamplingError, ImportError) as e:
            print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
            return 2
        except ValueError as e:  # TokenizerError and friends
            if type(e).__name__.endswith("Error") and type(e) is not ValueError:
                print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
                return 2
            raise
    return run


def _stats_line(engine) -> str:
    s = engine.last_stats
    line = (f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated; prefill {s.prefill_tok_s:.0f} tok/s, "
            f"decode {s.decode_tok_s:.1f} tok/s")
    if s.speculative:
        line += f"; {s.speculative} draft(s)/step, acceptance {s.acceptance_rate:.1%}, {s.tokens_per_forward:.2f} tokens/forward"
    return line + "]"


def compile_now(engine, params, speculative: int, quiet: bool = False) -> None:
    """With --compile: compile the batch-1 step shapes `params` will use before the real request, so
    that its decode speed (and the chat's first answer) is not the compiler's. A short generation
    with the same sampling settings; Inductor's disk cache makes it quick after the first time."""
    if engine.compiled is None:
        return
    if not quiet:
        print("compiling the decode step (20-60 s per shape the first time, cached on disk after that) ...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    engine.generate([[0, 5, 6, 7]], params, max_tokens=24, ignore_eos=True, stop=None, speculative=speculative)
    if not quiet:
        print(f"compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


@_errors
def _cmd_generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    if args.ids:
        words = args.prompt.replace(",", " ").split()
        if not all(w.isascii() and w.isdigit() for w in words):  # ("²".isdigit(), but int("²") fails)
            from .sampling import SamplingError

            raise SamplingError(f"--ids: PROMPT must be token ids separated by spaces or commas, got {args.prompt!r}")
        prompt = [int(t) for t in words]
    else:
        prompt = args.prompt
    params = _params(args, logprobs=0 if args.json else None)
    compile_now(engine, params, args.speculative, quiet=args.quiet)
    if args.stream and not args.json:
        for chunk in engine.stream(prompt, params, speculative=args.speculative):
            if engine.tokenizer is not None:
                sys.stdout.write(shown(chunk.text))
            else:
                sys.stdout.write("".join(f" {t}" for t in chunk.token_ids))
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        r = engine.generate(prompt, params, speculative=args.speculative)
        if args.json:
            print(json.dumps({"text": r.text, "token_ids": r.token_ids, "logprobs": r.logprobs,
                              "finish_reason": r.finish_reason, "stop_reason": r.stop_reason,
                              "stats": engine.last_stats.as_dict()}))
        else:
            print(shown(r.text) if r.text is not None else " ".join(map(str, r.token_ids)))
    if not args.quiet:
        print(_stats_line(engine), file=sys.stderr)
    return 0


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # (\n, \t and \r pass)


def shown(text: str) -> str:
    """Model output for a terminal: control characters (escape sequences could move the cursor,
    retitle the window or worse) become visible \\xNN escapes; newlines and tabs stay."""
    if not sys.stdout.isatty():
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def answer_of(reply: str) -> str:
    """What of a reply goes back into the conversation: the answer after its reasoning (the text up
    to the last </think>), as R1's template keeps it and DeepSeek's multi-round guide says: earlier
    turns' reasoning is not part of the next prompt."""
    return reply.rsplit("</think>", 1)[-1].lstrip("\n") if "</think>" in reply else reply


def trim_history(engine, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest non-system turns until the prompt plus max_tokens fits the context.

    Returns (kept messages, prompt ids); raises SamplingError if even the last message cannot fit.
    """
    from .sampling import SamplingError

    msgs = list(messages)
    while True:
        ids = engine.chat_prompt(msgs)
        if len(ids) + min(max_tokens, engine.max_context // 2) <= engine.max_context:
            return msgs, ids
        turns = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        if len(turns) <= 1:
            raise SamplingError(f"the message is {len(ids)} tokens; the context holds {engine.max_context}")
        del msgs[turns[0]]


@_errors
def _cmd_chat(args: argparse.Namespace) -> int:
    from .sampling import SamplingError

    engine = _engine(args)
    if engine.tokenizer is None:
        print(f"nanoseek chat: error: {args.model} has no tokenizer.json; chat needs one", file=sys.stderr)
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    params = _params(args)
    compile_now(engine, params, args.speculative)
    try:
        importlib.import_module("readline")  # line editing and history for input()
    except ImportError:  # (not on every platform)
        pass
    print("nanoseek chat: /reset clears the conversation, /exit (or Ctrl-D) quits.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # as in Python's own prompt: a fresh line, not the end of the chat
            print("\n(Ctrl-D or /exit quits)", flush=True)
            continue
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            return 0
        if msg == "/reset":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        try:
            kept, ids = trim_history(engine, system + history + [{"role": "user", "content": msg}], args.max_tokens)
        except SamplingError as e:  # this message alone is too long: refuse it, keep the conversation
            print(f"(not sent: {e})", flush=True)
            continue
        history = [m for m in kept if m["role"] != "system"]
        reply = []
        try:
            for chunk in engine.stream([ids], params, speculative=args.speculative):
                sys.stdout.write(shown(chunk.text))
                sys.stdout.flush()
                reply.append(chunk.text)
        except KeyboardInterrupt:
            print(" [interrupted]")
        print(flush=True)
        if args.verbose:
            print(_stats_line(engine), file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": answer_of("".join(reply))})


@_errors
def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    engine = _engine(args)
    V = engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (args.batch, args.prompt_len), generator=g).tolist()
    kw = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    # warm-up; with --compile it also compiles every step shape the timed run will see
    engine.generate(prompts, speculative=args.speculative, **{**kw, "max_tokens": 24 if args.compile else 4})
    t = time.perf_counter()
    engine.generate(prompts, speculative=args.speculative, **kw)
    wall = time.perf_counter() - t
    s = engine.last_stats
    out = {"model": args.model, "dtype": str(engine.dtype).replace("torch.", ""), "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": args.max_tokens, "threads": torch.get_num_threads(),
           "prefill_tok_s": round(s.prefill_tok_s, 1), "decode_tok_s": round(s.decode_tok_s, 1),
           "wall_s": round(wall, 3), "kv_bytes_per_token": engine.kv_cache_bytes_per_token(bool(args.speculative))}
    if args.speculative:
        out.update(acceptance_rate=round(s.acceptance_rate, 4), tokens_per_forward=round(s.tokens_per_forward, 3))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} {out['dtype']} batch {args.batch}, prompt {args.prompt_len}, {args.max_tokens} new tokens, "
              f"{out['threads']} threads: prefill {s.prefill_tok_s:.0f} tok/s, decode {s.decode_tok_s:.1f} tok/s"
              + (f", acceptance {s.acceptance_rate:.1%}, {s.tokens_per_forward:.2f} tokens/forward"
                 if args.speculative else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or token ids) from a prompt")
    p.add_argument("model", help="run directory, Hugging Face directory, Hub id or preset")
    p.add_argument("prompt", help="the prompt text (or token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="PROMPT is token ids, e.g. '0 15 27'")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (not with --json, which prints one object at the end)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no statistics line on stderr")
    _sampling_flags(p, temperature=0.0, max_tokens=128)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal (the model's chat template)")
    p.add_argument("model", help="run directory, Hugging Face directory or Hub id (needs a tokenizer.json)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", action="store_true", help="print speed after each answer")
    _sampling_flags(p, temperature=0.7, max_tokens=512)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("bench", help="prefill and decode tokens/s on random prompts")
    p.add_argument("model", help="run directory, Hugging Face directory, Hub id or preset")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--json", action="store_true")
    _sampling_flags(p, temperature=0.0, max_tokens=128)
    p.set_defaults(func=_cmd_bench)
