"""engine.kernels.first_working: the one fallback every kernel family (decode, MoE glue, FP8, prefill attention)
goes through."""

from __future__ import annotations

from engine.kernels import first_working


def test_a_failing_kernel_is_skipped_from_then_on_and_the_next_answers() -> None:
    calls: list[str] = []

    def broken_kernel(x: int) -> int:
        calls.append("broken")
        raise RuntimeError("no kernel image for this device")

    def working_kernel(x: int) -> int:
        calls.append("working")
        return x + 1

    broken: set[str] = set()
    candidates = [("a", broken_kernel), ("b", working_kernel)]
    assert first_working(broken, candidates, lambda x: -1, 1) == 2
    assert broken == {"a"} and calls == ["broken", "working"]
    assert first_working(broken, candidates, lambda x: -1, 5) == 6
    assert calls == ["broken", "working", "working"]  # the failed one is not tried again


def test_the_reference_answers_when_every_kernel_failed_or_none_applies() -> None:
    def failing(x: int) -> int:
        raise ValueError("launch failed")

    broken: set[str] = set()
    assert first_working(broken, [("a", failing)], lambda x: x * 10, 3) == 30
    assert broken == {"a"}
    assert first_working(set(), [], lambda x: x * 10, 4) == 40
