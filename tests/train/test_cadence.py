"""When the loop logs, checkpoints, evaluates and stops."""

import torch

from dinoscale import distributed
from dinoscale.train.cadence import should_checkpoint, should_evaluate, should_log, stop_agreed

CPU = torch.device("cpu")


def test_log_and_checkpoint_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 8) if should_log(s, log_every=3, max_steps=7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if should_log(s, log_every=1, max_steps=7)] == list(range(1, 8))
    assert [s for s in range(1, 11) if should_checkpoint(s, checkpoint_every=4, max_steps=10)] == [4, 8, 10]


def test_evaluate_every_period_but_not_at_the_last_step_nor_when_off():
    assert [s for s in range(1, 7) if should_evaluate(s, period=2, max_steps=6)] == [2, 4]
    assert not any(should_evaluate(s, period=p, max_steps=6) for s in range(1, 7) for p in (0, None))


def test_one_process_reads_the_stop_request_every_step():
    flags = iter([False, False, True])
    assert [stop_agreed(lambda: next(flags), log_step=False, device=CPU) for _ in range(3)] == [False, False, True]
    assert stop_agreed(None, log_step=True, device=CPU) is False


def test_several_processes_agree_on_a_stop_only_at_log_steps(monkeypatch):
    # The agreement's all-reduce is a sum over ranks: with no process group it is this rank's flag alone.
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    reads = []

    def requested():
        reads.append(1)
        return True

    assert stop_agreed(requested, log_step=False, device=CPU) is False
    assert reads == []  # between log steps the flag is not even read: ranks could disagree
    assert stop_agreed(requested, log_step=True, device=CPU) is True
    assert reads == [1]
