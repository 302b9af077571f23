"""The simulated engine (connectors.sim_engine) on a fake clock: its step times follow the H100 profile, tokens and
usage are counted, cancellation frees the batch slot, and it is only ever used when asked for by name."""

from __future__ import annotations

import asyncio

import pytest

from connectors.sim_engine import PROFILES, SimEngine, estimate_prompt_tokens, is_simulated_model, sim_profile
from engine.runtime.request import GenerateRequest

H100 = PROFILES["h100"]


class FakeClock:
    """Simulated time: ``sleep`` advances it at once (and yields so other tasks run)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


def _engine() -> tuple[SimEngine, FakeClock]:
    clock = FakeClock()
    return SimEngine(H100, sleep=clock.sleep, now=clock.now), clock


def _request(max_tokens: int, prompt_len: int = 512) -> GenerateRequest:
    return GenerateRequest(prompt_token_ids=[1] * prompt_len, max_tokens=max_tokens)


async def _collect(engine: SimEngine, request: GenerateRequest) -> list:
    return [d async for d in engine.generate(request)]


def test_profile_is_the_measured_table_and_interpolates() -> None:
    assert H100.decode_ms(1) == pytest.approx(3.44)
    assert H100.decode_ms(32) == pytest.approx(17.51)
    assert H100.decode_ms(64) == pytest.approx(24.77)
    assert 3.44 < H100.decode_ms(4) < 8.97
    assert H100.decode_ms(24) == pytest.approx((14.29 + 17.51) / 2)
    assert H100.prefill_tok_s == 65_568.0


@pytest.mark.parametrize("batch", [1, 8, 32, 64])
def test_decode_step_time_follows_the_profile(batch: int) -> None:
    engine, clock = _engine()
    new_tokens, prompt = 101, 512

    async def main() -> list[list]:
        return await asyncio.gather(*[_collect(engine, _request(new_tokens, prompt)) for _ in range(batch)])

    outs = asyncio.run(main())
    # one prefill step (all prompts together, plus no decoders), then 100 decode steps at this batch size
    expected = batch * prompt / H100.prefill_tok_s + 100 * H100.decode_ms(batch) / 1000
    assert clock.t == pytest.approx(expected, rel=0.02)
    assert engine.steps == 101
    for deltas in outs:
        assert sum(len(d.token_ids) for d in deltas) == new_tokens
        last = deltas[-1]
        assert last.finish_reason == "length"
        assert last.usage is not None and last.usage.completion_tokens == new_tokens
        assert last.usage.prompt_tokens == prompt
    assert engine.stats()["generated_tokens"] == batch * new_tokens


def test_prefill_costs_prompt_tokens_at_the_measured_rate() -> None:
    engine, clock = _engine()
    asyncio.run(_collect(engine, _request(1, prompt_len=8192)))
    assert clock.t == pytest.approx(8192 / 65_568.0)


def test_batch_beyond_max_waits() -> None:
    engine, clock = _engine()

    async def main() -> None:
        await asyncio.gather(*[_collect(engine, _request(10)) for _ in range(H100.max_batch + 1)])

    asyncio.run(main())
    assert engine.stats()["generated_tokens"] == (H100.max_batch + 1) * 10
    assert engine.steps > 10  # the 65th ran after a slot freed


def test_replies_stop_after_a_typical_length() -> None:
    engine, _ = _engine()
    deltas = asyncio.run(_collect(engine, _request(5000)))
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage.completion_tokens == H100.stop_after


def test_cancellation_frees_the_slot() -> None:
    engine, _ = _engine()

    async def main() -> None:
        stream = engine.generate(_request(1000))
        got = [await stream.__anext__() for _ in range(3)]
        assert len(got) == 3 and engine.stats()["running"] == 1
        await stream.aclose()
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        # the engine keeps serving others
        deltas = await _collect(engine, _request(4))
        assert deltas[-1].finish_reason == "length"
        await engine.shutdown()
        assert not engine.alive

    asyncio.run(main())


def test_messages_are_sized_without_a_tokenizer() -> None:
    text = GenerateRequest(messages=[{"role": "user", "content": "x" * 4000}])
    assert 1000 <= estimate_prompt_tokens(text, 1024) <= 1010
    image = GenerateRequest(messages=[{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                                   {"type": "text", "text": "hi"}]}])
    assert estimate_prompt_tokens(image, 1024) >= 1024


def test_only_named_sim_models_are_simulated() -> None:
    assert is_simulated_model("sim:h100")
    assert not is_simulated_model(None)
    assert not is_simulated_model("moonshotai/Kimi-VL-A3B-Instruct")
    assert not is_simulated_model("/models/sim")
    with pytest.raises(ValueError, match="unknown simulated profile"):
        sim_profile("sim:tpu")
    with pytest.raises(ValueError, match="not a simulated model"):
        sim_profile("kimi")
