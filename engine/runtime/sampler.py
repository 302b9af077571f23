"""Batched next-token sampler: one call per runtime step turns a ``(B, V)`` logits tensor into ``B`` token ids.

Per row, in this order (the same as vLLM / HF):

1. **Penalties.** Repetition penalty over the prompt *and* output tokens (HF/vLLM: a seen token's logit is divided
   by the penalty when positive, multiplied when not); then the OpenAI presence/frequency penalties over the output
   tokens only (``logit -= frequency * count + presence * (count > 0)``). Built with one scatter into ``(B, V)``
   tensors from the flattened id lists; ids outside ``[0, V)`` are ignored.
2. **Allowed mask** (guided decoding): disallowed tokens get ``-inf``. It is applied after the penalties, so no
   penalty (a negative presence penalty included) can revive a masked token, and ``-inf`` survives the temperature.
   A row whose mask allows nothing raises :class:`SamplerError`.
3. **Greedy rows** (``temperature < 1e-5``, like vLLM's epsilon) take ``argmax`` of these processed logits. With no
   penalties and no mask the logits are not touched at all, so greedy output is exactly ``logits.argmax(-1)``
   (first index on ties), as a plain model would give.
4. **Sampled rows:** divide by the temperature; top-k (keep logits >= the k-th largest); top-p (keep the smallest
   set of most likely tokens whose mass reaches ``top_p``: a token stays iff the mass strictly before it, in
   descending order, is ``< top_p``); min-p (drop tokens whose probability is below ``min_p`` times the largest,
   i.e. ``logit < max_logit + log(min_p)``, which is the same before or after renormalising). The filters work by
   value thresholds, so tokens *tied* with a boundary token are all kept (the kept set can exceed ``k`` or the
   smallest top-p set on exact ties; the result never depends on a sort's tie order). Rows with only top-k use
   ``torch.topk``; rows without top-k/top-p do no sort or topk at all. Rows with top-p first try the
   ``TOP_P_PREFIX`` (4096) largest logits via ``torch.topk`` (normalised against the whole row, so exact); a row whose
   nucleus does not fit in that prefix (or whose top-k exceeds it) falls back to one full sort. Finding those rows is
   the only host sync before the end, and happens only when some row has ``top_p < 1``.
5. **Draw** by inverse CDF: one uniform ``u`` in ``[0, 1)`` per sampled row per step; the token is the first index
   whose float64 cumulative probability exceeds ``u * total`` (two levels: blocks of ``DRAW_BLOCK`` tokens, then
   inside the chosen block). Zero-probability tokens (masked or filtered) are never chosen: every cumulative sum is
   flat across them. ``u`` comes from the row's own generator (``make_generator(seed)``, a CPU ``torch.Generator``)
   or, for unseeded rows, from torch's global CPU generator (``torch.manual_seed`` makes those repeatable too).
   A seeded request gets the same tokens whatever else is in the batch and whatever its row index: its generator
   advances by exactly one number per sampled step (none on greedy steps), every op is row-wise, and each row's
   path (top-p shortcut or fallback) depends on that row alone. Caveat: a reduction kernel may split its work
   (hence round) differently for another batch shape, which can flip a token only when ``u`` lands within ~1e-7
   of a CDF boundary; the model's own batched bf16 logits vary far more than that.

   (Why not the exponential-race / Gumbel trick? It needs ``V`` random numbers per seeded row per step from that
   row's CPU generator: ~0.5-4 ms per row for V=163840 on CPU plus a 42 MB host-to-device copy for B=64, i.e. tens
   of ms per step. The inverse CDF needs one number per row.)

**Logprobs** (``params.logprobs is not None``): ``log_softmax`` of the processed logits after penalties, the allowed
mask and the temperature (temperature 1 for greedy rows), *before* top-k/top-p/min-p truncation. Masked tokens have
``-inf`` there and are left out of ``top``; ``top`` holds up to ``logprobs`` pairs ``(token_id, logprob)`` sorted by
logprob, descending.

Host/device traffic: per-row parameters + uniforms, row indices, and each penalty's ids go to the device in one copy
each (pinned + non-blocking on CUDA); all results (tokens, mask check, logprobs) come back in one copy at the end.
Penalty ids are re-sent every step (``O(prompt + output)`` host work, only for rows that use a penalty).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.runtime.request import SamplingParams, TokenLogprob

__all__ = ["SamplerError", "SamplerInput", "SamplerOutput", "PendingSample", "make_generator", "plain_greedy", "sample",
           "sample_async", "GREEDY_EPS"]

GREEDY_EPS = 1e-5
"""Temperatures below this are treated as greedy (dividing by them would overflow float32 logits)."""

_NEG_INF = float("-inf")

TOP_P_PREFIX = 4096
"""top-p first tries the ``TOP_P_PREFIX`` largest logits (``torch.topk``); rows whose nucleus is larger fall back to a
full sort (one host sync to find them). Module-level so tests can shrink it."""

DRAW_BLOCK = 1024
"""Block size of the two-level inverse-CDF draw (vocabularies up to 4x this use one level)."""


class SamplerError(ValueError):
    """Invalid sampler input, e.g. a guided-decoding mask that allows no token for some row."""


@dataclass
class SamplerInput:
    logits: torch.Tensor  # (B, V) float32 (other float dtypes are upcast), on the model's device
    params: list[SamplingParams]  # per row
    generators: list[torch.Generator | None]  # per row; seeded requests own one (see make_generator)
    prompt_token_ids: list[list[int]]  # per row, for the repetition penalty (prompt + output tokens)
    output_token_ids: list[list[int]]  # per row, generated so far: repetition and presence/frequency penalties
    allowed_mask: torch.Tensor | None = None  # (B, V) bool, True = allowed; rows may be all-True
    plain_greedy: bool | None = None  # the caller knows every row is plain_greedy(params) (None: check here)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows whose params.logprobs is None
    nonfinite_rows: list[int] = field(default_factory=list)  # rows whose logits held NaN/inf: their token is void


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded once with ``seed`` (any Python int; reduced mod 2**64), or None for no seed.

    The request keeps it for its whole life; the sampler draws one number from it per sampled step.
    """
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


# --------------------------------------------------------------------------------------------------------------
# host -> device helpers


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _flatten_ids(
    rows: list[int], id_lists: list[Sequence[Sequence[int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row index, token id) int64 device tensors for ``rows``; each row's ids from all ``id_lists`` in turn.

    Rows may be lists, numpy arrays or CPU tensors of ints. One host-to-device copy (numpy, not ``torch.tensor`` on
    nested lists, which is ~10x slower).
    """
    parts = [ids[r] for r in rows for ids in id_lists]
    lengths = [sum(len(ids[r]) for ids in id_lists) for r in rows]
    total = sum(lengths)
    if all(isinstance(seq, list) for seq in parts):
        flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=total)
    else:
        flat = np.concatenate([np.asarray(seq, dtype=np.int64).reshape(-1) for seq in parts] or [np.zeros(0, np.int64)])
    host = torch.empty(total + len(rows) * 2, dtype=torch.int64)
    host[:total] = torch.from_numpy(flat)
    host[total : total + len(rows)] = torch.tensor(rows, dtype=torch.int64)
    host[total + len(rows) :] = torch.tensor(lengths, dtype=torch.int64)
    dev = _to_device(host, device)
    row_of = torch.repeat_interleave(dev[total : total + len(rows)], dev[total + len(rows) :], output_size=total)
    return row_of, dev[:total]


def _scatter_ids(row_of: torch.Tensor, ids: torch.Tensor, shape: tuple[int, int], count: bool) -> torch.Tensor:
    """(B, V) float32 occurrence counts, or bool ``seen``; ids outside [0, V) go to a dropped extra column (no sync,
    no device assert). Counts use scatter_add of exact 1.0s, so atomics' order cannot change the result."""
    b, v = shape
    flat_idx = row_of * (v + 1) + torch.where((ids >= 0) & (ids < v), ids, v)
    if count:
        out = torch.zeros(b * (v + 1), dtype=torch.float32, device=ids.device)
        out.scatter_add_(0, flat_idx, torch.ones((), dtype=torch.float32, device=ids.device).expand(flat_idx.shape[0]))
    else:
        out = torch.zeros(b * (v + 1), dtype=torch.bool, device=ids.device)
        out.index_fill_(0, flat_idx, True)
    return out.view(b, v + 1)[:, :v]


# --------------------------------------------------------------------------------------------------------------


def _validate(inp: SamplerInput) -> tuple[int, int]:
    logits = inp.logits
    if logits.dim() != 2:
        raise SamplerError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    b, v = logits.shape
    if not logits.is_floating_point():
        raise SamplerError(f"logits must be floating point, got {logits.dtype}")
    for name in ("params", "generators", "prompt_token_ids", "output_token_ids"):
        if len(getattr(inp, name)) != b:
            raise SamplerError(f"{name} has {len(getattr(inp, name))} rows, logits has {b}")
    mask = inp.allowed_mask
    if mask is not None:
        if mask.shape != logits.shape or mask.dtype != torch.bool:
            raise SamplerError(
                f"allowed_mask must be bool of shape {tuple(logits.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if mask.device != logits.device:
            raise SamplerError(f"allowed_mask is on {mask.device}, logits on {logits.device}")
    return b, v


# columns of the packed per-row parameter tensor
_T, _TOP_P, _TOP_K, _LOG_MIN_P, _REP, _PRES, _FREQ, _U, _NCOLS = range(9)


def plain_greedy(p: SamplingParams) -> bool:
    """Greedy with no penalty and no logprobs: the row's token is just ``argmax`` (the one-kernel path)."""
    return (p.temperature < GREEDY_EPS and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0 and p.logprobs is None)


class PendingSample:
    """A sampling step launched on the device whose results the host has not read yet.

    ``tokens`` (device, int64) can feed the next step at once; :meth:`result` waits for the one device->host copy
    (started, non-blocking into pinned memory, when the sample was launched) and parses it."""

    def __init__(self, tokens: torch.Tensor, flat: torch.Tensor, parse) -> None:
        self.tokens = tokens
        self._parse = parse
        self._event = None
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            flat = host
        self._flat = flat
        self._output: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            self._output = self._parse(self._flat.tolist())
        return self._output


def sample(inp: SamplerInput) -> SamplerOutput:
    """Choose one token per row. See the module docstring for the exact semantics."""
    return sample_async(inp).result()


def sample_async(inp: SamplerInput) -> PendingSample:
    """:func:`sample` without waiting for the device: the tokens stay on the device (for the next step's inputs)
    and everything the host needs comes back in one non-blocking copy, read by ``result()``. Errors in the input
    raise here; a guided mask that allows no token raises from ``result()``."""
    b, v = _validate(inp)
    params = inp.params
    device = inp.logits.device
    x = inp.logits if inp.logits.dtype == torch.float32 else inp.logits.float()
    if b == 0:
        return PendingSample(torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.float64),
                             lambda flat: SamplerOutput(token_ids=[], logprobs=[]))
    if inp.allowed_mask is None and (inp.plain_greedy or (inp.plain_greedy is None
                                                          and all(plain_greedy(p) for p in params))):
        # the common decode case: one max kernel and one device->host copy, no parameter upload. A row's max
        # is NaN or +inf when the row holds one (max propagates NaN), so it doubles as the divergence check.
        best, index = x.max(dim=-1)

        def parse_greedy(flat: list[float]) -> SamplerOutput:
            return SamplerOutput(token_ids=[int(t) for t in flat[:b]], logprobs=[None] * b,
                                 nonfinite_rows=[r for r, v in enumerate(flat[b:]) if not math.isfinite(v)])

        return PendingSample(index, torch.cat([index.to(torch.float64), best.to(torch.float64)]), parse_greedy)
    finite = torch.isfinite(x).all(dim=-1)  # a diverged row must fail, not emit the argmax of NaNs

    # ---- host-side plan: which rows need what (no device work, no sync) ---------------------------------------
    greedy = [r for r, p in enumerate(params) if p.temperature < GREEDY_EPS]
    sampled = [r for r, p in enumerate(params) if p.temperature >= GREEDY_EPS]
    rep_rows = [r for r, p in enumerate(params) if p.repetition_penalty != 1.0]
    pf_rows = [r for r, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    lp_rows = [r for r, p in enumerate(params) if p.logprobs is not None]
    # positions *within the sampled subset*
    pos_p = [i for i, r in enumerate(sampled) if params[r].top_p < 1.0]
    pos_k = [i for i, r in enumerate(sampled) if params[r].top_p >= 1.0 and 0 < params[r].top_k < v]
    pos_m = [i for i, r in enumerate(sampled) if params[r].min_p > 0.0]

    # one uniform per sampled row: the row's own generator, else torch's global CPU generator
    unseeded = [r for r in sampled if inp.generators[r] is None]
    shared_u = torch.rand(len(unseeded), dtype=torch.float32).tolist() if unseeded else []
    u = [0.0] * b
    for r, val in zip(unseeded, shared_u):
        u[r] = val
    for r in sampled:
        g = inp.generators[r]
        if g is not None:
            u[r] = torch.rand(1, dtype=torch.float32, generator=g, device=g.device).item()

    host = torch.empty(b, _NCOLS, dtype=torch.float64)
    host[:, :_U] = torch.tensor(
        [
            [
                p.temperature if p.temperature >= GREEDY_EPS else 1.0,
                p.top_p,
                float(p.top_k if 0 < p.top_k < v else v),
                math.log(p.min_p) if p.min_p > 0.0 else _NEG_INF,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
            ]
            for p in params
        ],
        dtype=torch.float64,
    )
    host[:, _U] = torch.tensor(u, dtype=torch.float64)
    index_lists = [greedy, sampled, lp_rows, pos_p, pos_k, pos_m]
    idx_host = torch.tensor(list(itertools.chain.from_iterable(index_lists)), dtype=torch.int64)
    # ---- one copy each for parameters and row indices ---------------------------------------------------------
    dev_params = _to_device(host, device)
    dev_idx = _to_device(idx_host, device)
    g_idx, s_idx, lp_idx, p_idx, k_idx, m_idx = torch.split(dev_idx, [len(lst) for lst in index_lists])
    temp = dev_params[:, _T].float()

    # ---- penalties --------------------------------------------------------------------------------------------
    if rep_rows:
        row_of, ids = _flatten_ids(rep_rows, [inp.prompt_token_ids, inp.output_token_ids], device)
        seen = _scatter_ids(row_of, ids, (b, v), count=False)
        pen = dev_params[:, _REP].float().unsqueeze(1)
        x = torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)
    if pf_rows:
        row_of, ids = _flatten_ids(pf_rows, [inp.output_token_ids], device)
        counts = _scatter_ids(row_of, ids, (b, v), count=True)
        pres = dev_params[:, _PRES].float().unsqueeze(1)
        freq = dev_params[:, _FREQ].float().unsqueeze(1)
        x = x - freq * counts - pres * (counts > 0).float()
    row_ok = None
    if inp.allowed_mask is not None:
        x = x.masked_fill(~inp.allowed_mask, _NEG_INF)
        row_ok = inp.allowed_mask.any(dim=-1)

    # ---- choose -----------------------------------------------------------------------------------------------
    tokens = torch.empty(b, dtype=torch.int64, device=device)
    if len(greedy) == b:
        tokens = x.argmax(dim=-1)
    elif greedy:
        tokens[g_idx] = x.index_select(0, g_idx).argmax(dim=-1)
    if sampled:
        all_sampled = len(sampled) == b  # then skip the (B, V) row gathers
        sp = dev_params if all_sampled else dev_params.index_select(0, s_idx)
        xs = (x if all_sampled else x.index_select(0, s_idx)) / sp[:, _T].float().unsqueeze(1)
        k_max = max((params[sampled[i]].top_k for i in pos_k), default=1)
        n = len(sampled)
        xs = _filter(xs, sp, p_idx, k_idx, m_idx, k_max, (len(pos_p) == n, len(pos_k) == n, len(pos_m) == n))
        chosen = _draw(torch.softmax(xs, dim=-1), sp[:, _U])
        if len(sampled) == b:
            tokens = chosen
        else:
            tokens[s_idx] = chosen

    # ---- logprobs ---------------------------------------------------------------------------------------------
    top_n = max((params[r].logprobs or 0 for r in lp_rows), default=0)
    pieces = [tokens.double(), finite.double()]
    if row_ok is not None:
        pieces.append(row_ok.double())
    if lp_rows:
        if len(lp_rows) == b:
            lsm, lp_tokens = torch.log_softmax(x / temp.unsqueeze(1), dim=-1), tokens
        else:
            lsm = torch.log_softmax(x.index_select(0, lp_idx) / temp.index_select(0, lp_idx).unsqueeze(1), dim=-1)
            lp_tokens = tokens.index_select(0, lp_idx)
        pieces.append(lsm.gather(1, lp_tokens.unsqueeze(1)).squeeze(1).double())
        if top_n:
            top = torch.topk(lsm, min(top_n, v), dim=-1)
            pieces += [top.values.double().flatten(), top.indices.double().flatten()]

    # ---- the one device -> host copy --------------------------------------------------------------------------
    return PendingSample(tokens, torch.cat(pieces), lambda flat: _parse(flat, b, v, params, lp_rows, top_n,
                                                                         row_ok is not None))


def _parse(flat: list[float], b: int, v: int, params: list[SamplingParams], lp_rows: list[int], top_n: int,
           masked: bool) -> SamplerOutput:
    """The host side of :func:`sample_async`: tokens, non-finite rows, mask check and logprobs from the one copy."""
    token_ids = [int(t) for t in flat[:b]]
    nonfinite_rows = [r for r in range(b) if flat[b + r] == 0.0]
    pos = 2 * b
    if masked:
        bad = [r for r in range(b) if flat[pos + r] == 0.0]
        pos += b
        if bad:
            raise SamplerError(f"allowed_mask allows no token in row(s) {bad}")
    logprobs: list[TokenLogprob | None] = [None] * b
    if lp_rows:
        n_lp = len(lp_rows)
        chosen_lp = flat[pos : pos + n_lp]
        pos += n_lp
        width = min(top_n, v)
        top_vals = flat[pos : pos + n_lp * width]
        top_ids = flat[pos + n_lp * width : pos + 2 * n_lp * width]
        for j, r in enumerate(lp_rows):
            n = params[r].logprobs or 0
            pairs = [
                (int(top_ids[j * width + c]), top_vals[j * width + c])
                for c in range(min(n, width))
                if top_vals[j * width + c] != _NEG_INF
            ]
            logprobs[r] = TokenLogprob(token_id=token_ids[r], logprob=chosen_lp[j], top=pairs)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs, nonfinite_rows=nonfinite_rows)


def _filter(
    xs: torch.Tensor,
    sp: torch.Tensor,
    p_idx: torch.Tensor,
    k_idx: torch.Tensor,
    m_idx: torch.Tensor,
    k_max: int,
    all_rows: tuple[bool, bool, bool] = (False, False, False),
) -> torch.Tensor:
    """top-k, top-p, min-p on temperature-scaled logits ``xs`` (S, V); ``sp`` the packed params of those rows;
    ``k_max`` the largest top-k among the ``k_idx`` rows (known on the host, so no sync); ``all_rows`` says which
    of the three index sets is every row in order (then no row gather/scatter is needed).

    Each row takes the same path whatever else is in the batch (the top-p shortcut or its fallback is decided per
    row), so a seeded row's result does not depend on its neighbours."""
    v = xs.shape[1]
    p_all, k_all, m_all = all_rows

    def rows(t: torch.Tensor, idx: torch.Tensor, every: bool) -> torch.Tensor:
        return t if every else t.index_select(0, idx)

    def put(t: torch.Tensor, idx: torch.Tensor, every: bool, new: torch.Tensor) -> torch.Tensor:
        return new if every else t.index_copy(0, idx, new)

    if p_idx.numel():
        sub = rows(xs, p_idx, p_all)
        sub_params = rows(sp, p_idx, p_all)
        k = sub_params[:, _TOP_K].long().clamp_(1, v).unsqueeze(1)  # top-k disabled -> v
        top_p = sub_params[:, _TOP_P].float().unsqueeze(1)
        if v <= TOP_P_PREFIX:
            threshold = _top_p_threshold_sorted(sub, k, top_p)
        else:
            threshold, resolved = _top_p_threshold_prefix(sub, k, top_p, TOP_P_PREFIX)
            if not bool(resolved.all()):  # the only mid-step sync, and only for top-p rows
                redo = (~resolved).nonzero().squeeze(1)
                redone = _top_p_threshold_sorted(
                    sub.index_select(0, redo), k.index_select(0, redo), top_p.index_select(0, redo)
                )
                threshold = threshold.index_copy(0, redo, redone)
        xs = put(xs, p_idx, p_all, sub.masked_fill(sub < threshold, _NEG_INF))
    if k_idx.numel():
        # rows with top-k only: topk to the largest k among them, then each row's own k-th value
        sub = rows(xs, k_idx, k_all)
        k = rows(sp, k_idx, k_all)[:, _TOP_K].long()
        kth = torch.topk(sub, k_max, dim=-1).values.gather(1, (k - 1).clamp_(0, k_max - 1).unsqueeze(1))
        xs = put(xs, k_idx, k_all, sub.masked_fill(sub < kth, _NEG_INF))
    if m_idx.numel():
        sub = rows(xs, m_idx, m_all)
        log_min_p = rows(sp, m_idx, m_all)[:, _LOG_MIN_P].float().unsqueeze(1)
        cutoff = sub.max(dim=-1, keepdim=True).values + log_min_p
        xs = put(xs, m_idx, m_all, sub.masked_fill(sub < cutoff, _NEG_INF))
    return xs


def _top_p_cut(sorted_vals: torch.Tensor, log_z: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Number of leading tokens kept: those whose mass strictly before them (descending order) is < top_p."""
    probs = torch.softmax(sorted_vals, dim=-1) if log_z is None else torch.exp(sorted_vals - log_z)
    mass_before = probs.cumsum(dim=-1) - probs
    return (mass_before < top_p).sum(dim=-1, keepdim=True)


def _top_p_threshold_sorted(sub: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(n, 1) logit threshold of top-k then top-p, from one full descending sort."""
    sorted_vals = sub.sort(dim=-1, descending=True).values
    kth = sorted_vals.gather(1, k - 1)
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, _NEG_INF)
    keep_n = _top_p_cut(sorted_vals, None, top_p).clamp_(min=1)
    return sorted_vals.gather(1, keep_n - 1)


def _top_p_threshold_prefix(
    sub: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same threshold from the ``prefix`` largest logits only (``torch.topk``, ~4x cheaper than a sort of V=163840).

    The normaliser comes from the whole (top-k-truncated) row, so the prefix's probabilities are exact; the result is
    valid (``resolved``) where the cut falls inside the prefix, i.e. some prefix token already has mass before it
    >= top_p, and where top-k is off or k <= prefix (else the k-th logit is not in the prefix)."""
    top = torch.topk(sub, prefix, dim=-1).values  # sorted, descending
    v = sub.shape[1]
    kth = torch.where(k < v, top.gather(1, (k - 1).clamp(max=prefix - 1)), _NEG_INF)
    top = top.masked_fill(top < kth, _NEG_INF)
    log_z = torch.logsumexp(sub.masked_fill(sub < kth, _NEG_INF), dim=-1, keepdim=True)
    keep_n = _top_p_cut(top, log_z, top_p)
    resolved = ((keep_n < prefix) & ((k <= prefix) | (k >= v))).squeeze(1)
    return top.gather(1, keep_n.clamp(1, prefix) - 1), resolved


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one token per row: the first index whose cumulative probability exceeds ``u * total``.

    ``probs`` (S, V) float32, unnormalised is fine; ``u`` (S,) float64 in [0, 1 - 2**-24]. Two levels so the
    float64 prefix sums are short: block sums of ``DRAW_BLOCK`` tokens, pick the block, then pick inside it.
    A zero-probability token is never returned: every cumulative sum is flat across it.
    """
    s, v = probs.shape
    block = DRAW_BLOCK if v > 4 * DRAW_BLOCK else v
    n_blocks = -(-v // block)
    if n_blocks * block != v:
        probs = torch.nn.functional.pad(probs, (0, n_blocks * block - v))
    blocks = probs.view(s, n_blocks, block)
    block_mass = blocks.sum(dim=-1, dtype=torch.float64)  # (S, n_blocks)
    cum = block_mass.cumsum(dim=-1)
    target = (u * cum[:, -1]).unsqueeze(1)  # < total, as u < 1
    b = torch.searchsorted(cum, target, right=True).clamp_(max=n_blocks - 1)  # a block of positive mass
    before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    # position inside the block, re-expressed against the block's own prefix sums and kept < 1 so rounding can't
    # push it past the block's last positive token
    frac = ((target - before) / block_mass.gather(1, b)).clamp_(0.0, 1.0 - 2.0**-30)
    inner = blocks.gather(1, b.unsqueeze(2).expand(s, 1, block)).squeeze(1).to(torch.float64).cumsum_(dim=-1)
    j = torch.searchsorted(inner, frac * inner[:, -1:], right=True).clamp_(max=block - 1)
    return (b * block + j).squeeze(1).clamp_(max=v - 1)
