"""The decode-time steps the engine runs whole: one function each, shared by the compiled step
(compiled.py, CPU) and the CUDA-graph step (cudagraph.py, GPU), so both run exactly the same code.

Each is a pure function of the model, tensors and the latent cache (which it writes), with no
Python branching on tensor values: a compiler can trace it and a CUDA graph can record it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.attention import LatentCache, take
from .speculative import greedy_accept


def forward_step(model: nn.Module, ids: torch.Tensor, start_pos: int | torch.Tensor,
                 cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, vocab], final hidden states [B, T, hidden]) of the tokens `ids` at start_pos."""
    out = model(ids, start_pos=start_pos, cache=cache, return_hidden=True)
    return out.logits, out.hidden_states


def mtp_step(model: nn.Module, next_tokens: torch.Tensor, hidden: torch.Tensor, start_pos: int | torch.Tensor,
             cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.mtp_step(0, ...)` with logits at every position: (hidden [B, T, H], logits [B, T, V])."""
    return model.mtp_step(0, next_tokens, hidden, start_pos=start_pos, cache=cache)


def greedy_verify_step(model: nn.Module, last: torch.Tensor, drafts: torch.Tensor, start_pos: int | torch.Tensor,
                       cache: LatentCache) -> tuple[torch.Tensor, ...]:
    """One speculative step for greedy rows: verification and the next draft together.

    The main model runs on [last, drafts]; the tokens following the verified positions are its
    argmaxes `best`: inside the accepted prefix they equal the drafts, at n_acc it is the new
    token, and the MTP module's output past n_acc is never read (its cache slots are rewritten).
    Returns (logits [B, k+1, V], emitted tokens [B, k+1] (-1 past the last), n_acc [B],
    MTP hidden state [B, 1, H] and MTP logits [B, V] at each row's position n_acc).
    """
    out = model(torch.cat((last[:, None], drafts), dim=1), start_pos=start_pos, cache=cache, return_hidden=True)
    best = out.logits.argmax(dim=-1)  # [B, k + 1]
    n_acc, tokens = greedy_accept(best, drafts)
    h_mtp, mtp_logits = model.mtp_step(0, best, out.hidden_states, start_pos=start_pos, cache=cache, logits_at=n_acc)
    return out.logits, tokens, n_acc, take(h_mtp, n_acc[:, None]), mtp_logits
