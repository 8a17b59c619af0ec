"""StallWatch: a busy slot is stalled only when its progress stops moving for stall_s."""

from core.engines.llama_rpc.stall import StallWatch


def _slot(n: int, processing: bool = True, task: int = 7, prompt: int = 5) -> dict[str, object]:
    return {"id": 0, "task": task, "processing": processing, "n_decoded": n,
            "n_prompt_processed": prompt}


def test_moving_slot_is_never_stalled_and_a_stuck_one_is_after_stall_s() -> None:
    watch = StallWatch(stall_s=2.0)
    assert watch.update([_slot(1)], 0.0) == []
    assert watch.update([_slot(5)], 1.5) == []  # moved: the clock starts over
    assert watch.update([_slot(5)], 3.0) == []  # 1.5 s stuck
    stalled = watch.update([_slot(5)], 3.6)
    assert [(s.slot, s.task, s.n_decoded) for s in stalled] == [(0, 7, 5)]
    assert "request 7" in stalled[0].sentence()


def test_idle_slot_and_a_new_request_are_not_stalled() -> None:
    watch = StallWatch(stall_s=2.0)
    watch.update([_slot(3)], 0.0)
    assert watch.update([_slot(3, processing=False)], 5.0) == []
    assert watch.update([_slot(3, task=8)], 6.0) == []  # a new task starts fresh
    assert watch.update([_slot(3, task=8)], 7.0) == []


def test_the_slowest_step_counts_only_whole_steps() -> None:
    watch = StallWatch(stall_s=2.0)
    watch.update([_slot(1)], 0.0)
    watch.update([_slot(2)], 0.5)  # the first move after first sight: a partial step
    assert watch.update([_slot(2)], 2.6)[0].slowest_step_s == 0.0
    watch.update([_slot(3)], 3.0)  # a whole step of 2.5 s
    stalled = watch.update([_slot(3)], 5.5)
    assert stalled[0].slowest_step_s == 2.5 and stalled[0].stalled_s == 2.5
