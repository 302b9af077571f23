"""Batched sampler (engine/runtime/sampler.py): semantics of each stage on small hand-made distributions (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.runtime import sampler as sampler_mod
from engine.runtime.request import SamplingParams
from engine.runtime.sampler import SamplerError, SamplerInput, make_generator, sample

NEG_INF = float("-inf")


@pytest.fixture(autouse=True, params=["default", "tiny-prefix-block1", "prefix3-block3"])
def internals(request, monkeypatch):
    """Run every test also with a tiny top-p prefix (so the topk shortcut and its full-sort fallback both run on
    these small vocabularies) and tiny draw blocks (two-level inverse CDF, with padding for prefix3-block3)."""
    if request.param == "tiny-prefix-block1":
        monkeypatch.setattr(sampler_mod, "TOP_P_PREFIX", 2)
        monkeypatch.setattr(sampler_mod, "DRAW_BLOCK", 1)
    elif request.param == "prefix3-block3":
        monkeypatch.setattr(sampler_mod, "TOP_P_PREFIX", 3)
        monkeypatch.setattr(sampler_mod, "DRAW_BLOCK", 3)
    return request.param


def _inp(logits, params, *, generators=None, prompt=None, output=None, mask=None) -> SamplerInput:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    b = logits.shape[0]
    if isinstance(params, SamplingParams):
        params = [params] * b
    return SamplerInput(
        logits=logits,
        params=list(params),
        generators=generators if generators is not None else [None] * b,
        prompt_token_ids=prompt if prompt is not None else [[] for _ in range(b)],
        output_token_ids=output if output is not None else [[] for _ in range(b)],
        allowed_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.bool),
    )


def _support(logits, params, n=400, mask=None, prompt=None, output=None) -> set[int]:
    """Tokens ever drawn in ``n`` independent draws (one batch of n identical rows)."""
    logits = torch.as_tensor(logits, dtype=torch.float32).expand(n, -1).clone()
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool).expand(n, -1).clone()
    torch.manual_seed(0)
    out = sample(_inp(logits, params, mask=mask, prompt=None if prompt is None else [prompt] * n,
                      output=None if output is None else [output] * n))
    return set(out.token_ids)


def _log_probs(probs) -> list[float]:
    return [math.log(p) for p in probs]


SAMPLED = SamplingParams(temperature=1.0)


# ---------------------------------------------------------------------------------------------------------------
# greedy


def test_greedy_is_exact_argmax():
    torch.manual_seed(1)
    logits = torch.randn(16, 1000)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1.0  # a tie: argmax takes the first index
    out = sample(_inp(logits, SamplingParams()))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[3] == 7
    assert out.logprobs == [None] * 16


def test_greedy_ignores_truncation_params_and_tiny_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    for p in (SamplingParams(top_k=1, top_p=0.1, min_p=0.9), SamplingParams(temperature=1e-7)):
        assert sample(_inp(logits, p)).token_ids == [1]


def test_greedy_rows_mixed_with_sampled_rows_stay_exact():
    torch.manual_seed(2)
    logits = torch.randn(8, 300)
    params = [SamplingParams() if r % 2 == 0 else SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=1.0)
              for r in range(8)]
    out = sample(_inp(logits, params, output=[[1, 2, 3]] * 8))
    for r in range(0, 8, 2):
        assert out.token_ids[r] == int(logits[r].argmax())


# ---------------------------------------------------------------------------------------------------------------
# penalties


def test_repetition_penalty_divides_positive_multiplies_negative():
    # token 0: 2.0 seen -> 1.0; token 1: 1.5 unseen; token 2: -0.5 seen -> -1.0 ; token 3: -0.8 unseen
    logits = [2.0, 1.5, -0.5, -0.8]
    p = SamplingParams(repetition_penalty=2.0, logprobs=4)
    out = sample(_inp(logits, p, prompt=[[0]], output=[[2]]))
    assert out.token_ids == [1]
    expected = torch.log_softmax(torch.tensor([1.0, 1.5, -1.0, -0.8]), -1)
    got = dict(out.logprobs[0].top)
    for t in range(4):
        assert got[t] == pytest.approx(float(expected[t]), abs=1e-6)


def test_repetition_penalty_counts_prompt_and_output_once():
    logits = [2.0, 1.5]
    p = SamplingParams(repetition_penalty=2.0)
    assert sample(_inp(logits, p, prompt=[[0]])).token_ids == [1]  # prompt only
    assert sample(_inp(logits, p, output=[[0]])).token_ids == [1]  # output only
    # many occurrences still divide once: 2.0 / 2 = 1.0 < 1.5
    assert sample(_inp([2.0, 0.9], p, prompt=[[0, 0, 0]], output=[[0, 0]])).token_ids == [0]


def test_presence_and_frequency_penalties_subtract_over_output_only():
    logits = [3.0, 2.5, 0.0, 1.0]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logprobs=4)
    # token 0 appears 3x in output -> 3 - 0.5 - 0.75 = 1.75; token 3 once -> 1 - 0.5 - 0.25 = 0.25;
    # token 1 appears only in the prompt -> untouched 2.5
    out = sample(_inp(logits, p, prompt=[[1, 1, 1]], output=[[0, 3, 0, 0]]))
    assert out.token_ids == [1]
    expected = torch.log_softmax(torch.tensor([1.75, 2.5, 0.0, 0.25]), -1)
    got = dict(out.logprobs[0].top)
    for t in range(4):
        assert got[t] == pytest.approx(float(expected[t]), abs=1e-6)


def test_negative_presence_penalty_boosts():
    p = SamplingParams(presence_penalty=-2.0)
    assert sample(_inp([1.0, 2.0], p, output=[[0]])).token_ids == [0]


def test_penalties_are_per_row_and_ignore_out_of_range_ids():
    logits = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    out = sample(_inp(logits, params, prompt=[[0, 17, -3], [0]], output=[[99], [0, 0]]))
    assert out.token_ids == [1, 0]  # row 1 has no penalty, its ids are irrelevant


# ---------------------------------------------------------------------------------------------------------------
# filters (sampled rows): support of the sampled distribution on hand-made logits


def test_top_k_keeps_k_largest():
    logits = _log_probs([0.1, 0.4, 0.2, 0.3])
    assert _support(logits, SamplingParams(temperature=1.0, top_k=2)) == {1, 3}
    assert _support(logits, SamplingParams(temperature=1.0, top_k=1)) == {1}
    assert _support(logits, SamplingParams(temperature=1.0, top_k=4)) == {0, 1, 2, 3}
    assert _support(logits, SamplingParams(temperature=1.0, top_k=100)) == {0, 1, 2, 3}


def test_top_p_smallest_set_reaching_mass():
    logits = _log_probs([0.125, 0.5, 0.25, 0.0625, 0.0625])  # dyadic: exact cumulative sums
    # sorted: 0.5 (1), 0.25 (2), 0.125 (0), 0.0625 (3), 0.0625 (4)
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.5)) == {1}  # 0.5 already reaches 0.5
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.51)) == {1, 2}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.75)) == {1, 2}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1, 2}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.01)) == {1}  # the top token always stays
    # tokens 3 and 4 tie at the boundary: both are kept
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.9)) == {0, 1, 2, 3, 4}


def test_top_p_applies_after_temperature_and_top_k():
    logits = _log_probs([0.125, 0.5, 0.25, 0.0625, 0.0625])
    # top-k 2 renormalises to {1: 2/3, 2: 1/3}; top_p 0.6 then keeps only token 1
    assert _support(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6)) == {1}
    assert _support(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.99)) == {0, 1, 2}
    # temperature 0.5 squares and renormalises: 0.5^2=0.25 vs 0.25^2=0.0625 ... token 1 has > 0.7 of the mass
    sharp = torch.tensor([0.125, 0.5, 0.25, 0.0625, 0.0625]) ** 2
    assert float(sharp.max() / sharp.sum()) > 0.7
    assert _support(logits, SamplingParams(temperature=0.5, top_p=0.7)) == {1}
    assert _support(logits, SamplingParams(temperature=1.0, top_p=0.7)) == {1, 2}


def test_min_p_drops_below_fraction_of_max():
    logits = _log_probs([0.05, 0.4, 0.3, 0.15, 0.1])
    # threshold 0.3 * 0.4 = 0.12: keeps 0.4, 0.3, 0.15
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.3)) == {1, 2, 3}
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.5)) == {1, 2}
    assert _support(logits, SamplingParams(temperature=1.0, min_p=1.0)) == {1}
    # after top-k 4 (drop 0.05) the ratios are unchanged: min_p 0.3 still keeps {1, 2, 3}
    assert _support(logits, SamplingParams(temperature=1.0, top_k=4, min_p=0.3)) == {1, 2, 3}


def test_filters_are_per_row():
    logits = torch.tensor(_log_probs([0.1, 0.4, 0.2, 0.3])).expand(4, -1)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_p=0.3), SamplingParams(temperature=1.0, min_p=0.7)]
    seen = [set() for _ in range(4)]
    torch.manual_seed(0)
    for _ in range(300):
        out = sample(_inp(logits, params))
        for r, t in enumerate(out.token_ids):
            seen[r].add(t)
    assert seen == [{1}, {0, 1, 2, 3}, {1}, {1, 3}]


# ---------------------------------------------------------------------------------------------------------------
# guided-decoding mask


MODES = [
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=5.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.0, presence_penalty=-2.0, frequency_penalty=-2.0, repetition_penalty=0.1),
    SamplingParams(presence_penalty=-2.0, repetition_penalty=0.1),
]


@pytest.mark.parametrize("params", MODES)
def test_mask_respected_in_every_mode(params):
    v, n = 50, 300
    torch.manual_seed(3)
    logits = torch.randn(n, v) * 3
    mask = torch.zeros(n, v, dtype=torch.bool)
    allowed = [2, 11, 40]
    mask[:, allowed] = True
    # the disallowed best tokens are also the penalised-up ones
    logits[:, 0] = 50.0
    prompt, output = [0, 1], [0, 0, 1, 2]
    out = sample(_inp(logits, params, mask=mask, prompt=[prompt] * n, output=[output] * n))
    assert set(out.token_ids) <= set(allowed)
    if params.temperature > 0:
        assert len(set(out.token_ids)) > 1  # still sampling among the allowed
    else:
        expected = [int(_reference_processed(row, params, prompt, output, m).argmax()) for row, m in zip(logits, mask)]
        assert out.token_ids == expected


def _reference_processed(row, params, prompt, output, mask_row):
    """Penalties + mask, one token at a time (the sampler does it with scatters)."""
    row = row.clone()
    for t in set(prompt) | set(output):
        row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
    for t in set(output):
        row[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return row.masked_fill(~mask_row, NEG_INF)


def test_penalties_match_reference_loop():
    torch.manual_seed(6)
    v = 20  # logprobs <= 20: the whole distribution comes back
    logits = torch.randn(6, v) * 2
    params = [SamplingParams(repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.3, logprobs=v),
              SamplingParams(repetition_penalty=0.6, logprobs=v),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5, logprobs=v),
              SamplingParams(logprobs=v),
              SamplingParams(repetition_penalty=3.0, frequency_penalty=-0.5, logprobs=v),
              SamplingParams(repetition_penalty=1.2, presence_penalty=2.0, logprobs=v)]
    prompts = [[1, 2, 3, 3], [], [5, 6], [7], [0, 19, 19], list(range(12))]
    outputs = [[3, 4, 4, 4], [8, 9], [5, 5, 10], [7, 7], [], [11, 12, 12, 13]]
    mask = torch.rand(6, v) > 0.2
    out = sample(_inp(logits, params, prompt=prompts, output=outputs, mask=mask))
    for r in range(6):
        ref = torch.log_softmax(_reference_processed(logits[r], params[r], prompts[r], outputs[r], mask[r]), -1)
        got = torch.full((v,), NEG_INF)
        for t, val in out.logprobs[r].top:
            got[t] = val
        assert torch.allclose(got, ref, atol=1e-5, equal_nan=False), r
        assert out.token_ids[r] == int(ref.argmax())


def test_all_true_mask_rows_change_nothing():
    torch.manual_seed(4)
    logits = torch.randn(4, 64)
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[1] = False
    mask[1, 5] = True
    out = sample(_inp(logits, SamplingParams(), mask=mask))
    assert out.token_ids == [int(logits[0].argmax()), 5, int(logits[2].argmax()), int(logits[3].argmax())]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9)])
def test_mask_allowing_nothing_raises(params):
    logits = torch.randn(3, 10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(SamplerError, match=r"row\(s\) \[2\]"):
        sample(_inp(logits, params, mask=mask))


def test_mask_single_allowed_token_far_in_tail_is_chosen():
    logits = torch.zeros(1, 1000)
    logits[0, :999] = 40.0  # token 999 has probability ~e^-40 before masking
    mask = torch.zeros(1, 1000, dtype=torch.bool)
    mask[0, 999] = True
    for p in MODES:
        assert sample(_inp(logits, p, mask=mask)).token_ids == [999]


# ---------------------------------------------------------------------------------------------------------------
# reproducibility


def _run_seeded(seed: int, logits_steps: list[torch.Tensor], companions: int, position: int) -> list[int]:
    """Decode len(logits_steps) steps for one seeded request placed at ``position`` among ``companions`` others."""
    torch.manual_seed(1234 + companions + position)  # other rows' randomness differs per layout
    gen = make_generator(seed)
    others_gen = [make_generator(s) if s % 3 == 0 else None for s in range(companions)]
    others_params = [
        SamplingParams(temperature=0.9, top_p=0.8) if i % 2 else SamplingParams() for i in range(companions)
    ]
    target = SamplingParams(temperature=1.1, top_k=40, top_p=0.95, min_p=0.01, seed=seed)
    got = []
    for step, row in enumerate(logits_steps):
        others = torch.randn(companions, row.shape[0])
        rows = list(others)
        rows.insert(position, row)
        params = list(others_params)
        params.insert(position, target)
        gens = list(others_gen)
        gens.insert(position, gen)
        out = sample(_inp(torch.stack(rows), params, generators=gens))
        got.append(out.token_ids[position])
    return got


def test_seeded_request_reproducible_across_batch_layouts():
    torch.manual_seed(5)
    steps = [torch.randn(500) * 2 for _ in range(25)]
    alone = _run_seeded(42, steps, companions=0, position=0)
    assert _run_seeded(42, steps, companions=0, position=0) == alone
    assert _run_seeded(42, steps, companions=5, position=3) == alone
    assert _run_seeded(42, steps, companions=9, position=9) == alone
    assert _run_seeded(43, steps, companions=0, position=0) != alone  # the seed matters


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.rand(3, generator=a).tolist() == torch.rand(3, generator=b).tolist()
    make_generator(-1)  # any int is accepted
    make_generator(2**70)


def test_unseeded_rows_follow_torch_global_seed():
    logits = torch.randn(10, 100)
    torch.manual_seed(9)
    a = sample(_inp(logits, SAMPLED)).token_ids
    torch.manual_seed(9)
    assert sample(_inp(logits, SAMPLED)).token_ids == a


# ---------------------------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_temperature_sampling_matches_softmax(temperature):
    n = 20000
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    torch.manual_seed(11)
    out = sample(_inp(logits.expand(n, -1).clone(), SamplingParams(temperature=temperature)))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=5).double() / n
    probs = torch.softmax(logits.double() / temperature, -1)
    # 4.5 standard errors of a binomial proportion
    tol = 4.5 * torch.sqrt(probs * (1 - probs) / n)
    assert torch.all((freq - probs).abs() < tol), (freq, probs)


def test_seeded_draws_match_softmax():
    n = 4000
    logits = torch.tensor([0.5, -1.0, 1.5, 0.0])
    gens = [make_generator(1000 + i) for i in range(n)]
    out = sample(_inp(logits.expand(n, -1).clone(), SamplingParams(temperature=1.0), generators=gens))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    probs = torch.softmax(logits.double(), -1)
    assert torch.all((freq - probs).abs() < 4.5 * torch.sqrt(probs * (1 - probs) / n)), (freq, probs)


def test_top_k_renormalises():
    n = 20000
    logits = torch.tensor(_log_probs([0.1, 0.4, 0.2, 0.3]))
    torch.manual_seed(12)
    out = sample(_inp(logits.expand(n, -1).clone(), SamplingParams(temperature=1.0, top_k=2)))
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    assert freq[1] == pytest.approx(4 / 7, abs=0.02)
    assert freq[3] == pytest.approx(3 / 7, abs=0.02)


# ---------------------------------------------------------------------------------------------------------------
# logprobs


def test_logprobs_greedy_equal_log_softmax_and_sorted_top():
    torch.manual_seed(13)
    logits = torch.randn(3, 200)
    params = [SamplingParams(logprobs=5), SamplingParams(), SamplingParams(logprobs=0)]
    out = sample(_inp(logits, params))
    lsm = torch.log_softmax(logits, -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(logits[0].argmax())
    assert lp.logprob == pytest.approx(float(lsm[0, lp.token_id]), abs=1e-6)
    assert [t for t, _ in lp.top] == torch.topk(lsm[0], 5).indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(torch.topk(lsm[0], 5).values.tolist(), abs=1e-6)
    assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.logprobs[1] is None
    assert out.logprobs[2].top == []
    assert out.logprobs[2].logprob == pytest.approx(float(lsm[2, out.token_ids[2]]), abs=1e-6)


def test_logprobs_sampled_use_temperature_before_truncation():
    torch.manual_seed(14)
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=0.5, top_k=3, logprobs=20)
    out = sample(_inp(logits, p))
    lsm = torch.log_softmax(logits[0] / 0.5, -1)
    lp = out.logprobs[0]
    assert lp.logprob == pytest.approx(float(lsm[lp.token_id]), abs=1e-5)
    assert len(lp.top) == 20  # not truncated to top_k
    assert [t for t, _ in lp.top] == torch.topk(lsm, 20).indices.tolist()
    assert lp.token_id in [t for t, _ in lp.top[:3]]


def test_logprobs_leave_masked_tokens_out():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[False, True, False, True]])
    out = sample(_inp(logits, SamplingParams(logprobs=4), mask=mask))
    lp = out.logprobs[0]
    assert out.token_ids == [1]
    expected = torch.log_softmax(torch.tensor([2.0, 0.0]), -1).tolist()
    assert [t for t, _ in lp.top] == [1, 3]
    assert [v for _, v in lp.top] == pytest.approx(expected, abs=1e-6)
    assert lp.logprob == pytest.approx(expected[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# input handling


def test_input_is_not_modified_and_bf16_is_accepted():
    torch.manual_seed(15)
    logits = torch.randn(4, 30)
    before = logits.clone()
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[:, 0] = False
    sample(_inp(logits, SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.5, presence_penalty=1.0),
                output=[[1, 2]] * 4, mask=mask))
    assert torch.equal(logits, before)
    bf = logits.bfloat16()
    out = sample(SamplerInput(bf, [SamplingParams()] * 4, [None] * 4, [[]] * 4, [[]] * 4))
    assert out.token_ids == bf.float().argmax(-1).tolist()


def test_empty_batch_and_bad_shapes():
    assert sample(SamplerInput(torch.zeros(0, 10), [], [], [], [])).token_ids == []
    with pytest.raises(SamplerError):
        sample(SamplerInput(torch.zeros(2, 10), [SamplingParams()], [None], [[]], [[]]))
    with pytest.raises(SamplerError):
        sample(_inp(torch.zeros(2, 10), SamplingParams(), mask=torch.ones(2, 9, dtype=torch.bool)))


def test_top_p_prefix_shortcut_equals_full_sort(monkeypatch):
    torch.manual_seed(16)
    s_rows, v = 24, 300
    xs = torch.randn(s_rows, v) * torch.linspace(0.3, 6.0, s_rows).unsqueeze(1)  # flat to peaked rows
    xs[0, :250] = NEG_INF  # masked tokens inside and outside the prefix
    top_p = [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999] * 3
    top_k = [0] * 8 + [1, 3, 5, 8, 16, 2, 7, 16] + [0, 4, 0, 9, 0, 17, 0, 120]  # 17, 120: k above the prefix
    sp = torch.zeros(s_rows, sampler_mod._NCOLS, dtype=torch.float64)
    sp[:, sampler_mod._TOP_P] = torch.tensor(top_p, dtype=torch.float64)
    sp[:, sampler_mod._TOP_K] = torch.tensor([k if k else v for k in top_k], dtype=torch.float64)
    p_idx = torch.arange(s_rows)
    empty = torch.zeros(0, dtype=torch.int64)
    monkeypatch.setattr(sampler_mod, "TOP_P_PREFIX", 16)
    fast = sampler_mod._filter(xs, sp, p_idx, empty, empty, 1)
    monkeypatch.setattr(sampler_mod, "TOP_P_PREFIX", v)
    full = sampler_mod._filter(xs, sp, p_idx, empty, empty, 1)
    assert torch.equal(fast.isinf(), full.isinf())
    kept = (~full.isinf()).sum(-1)
    assert kept.max() > 16 and kept.min() < 16  # both the shortcut and the fallback were needed


def test_draw_never_returns_zero_probability_tokens():
    probs = torch.zeros(6, 10)
    probs[0, 0] = 1.0
    probs[1, 9] = 1.0
    probs[2, [3, 4]] = torch.tensor([1e-30, 1.0])
    probs[3, [2, 7]] = 0.5
    probs[4, 5] = 1e-38
    probs[5] = 0.1
    for u in (0.0, 0.5, 1.0 - 2.0**-24):
        out = sampler_mod._draw(probs, torch.full((6,), u, dtype=torch.float64)).tolist()
        for r, t in enumerate(out):
            assert probs[r, t] > 0, (u, r, t)
    assert sampler_mod._draw(probs, torch.zeros(6, dtype=torch.float64)).tolist()[:5] == [0, 9, 3, 2, 5]
    last = torch.full((6,), 1.0 - 2.0**-24, dtype=torch.float64)
    assert sampler_mod._draw(probs, last).tolist() == [0, 9, 4, 7, 5, 9]
