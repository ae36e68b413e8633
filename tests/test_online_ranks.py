"""Online mode's rank logic under real ``torch.distributed`` (gloo, 2 and 4 CPU processes): each rank's producer is
asked after every training step, as in the trainer, while the ranks all-reduce a tensor each step as DDP does; a
rank that stalled would end the run with the group's timeout. The cases are real work (a file written), and the
failures real errors: a full disk (``/dev/full``) and an allocation beyond memory."""
from __future__ import annotations

import datetime
import json
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from nnunet_lefusion.config import TrainerSettings
from nnunet_lefusion.nnunet.online import OnlineProducer
from nnunet_lefusion.nnunet.online_budget import RankBudget, rank_share, unreachable

TIMEOUT_S = 20


class FileProducer(OnlineProducer):
    """The real producer, its case a file written (or a failure, or a slow case) as ``plan`` says per rank."""

    def __init__(self, settings: TrainerSettings, rank: int, world: int, folder: Path, plan: dict, log) -> None:
        super().__init__(None, folder, None, settings, "cpu", rank, world, log)
        self.plan = plan

    def produce(self, epoch: int) -> str:
        what = self.plan.get(f"{self.rank}/{epoch}/{self.budget.tried}")
        if what == "disk full":
            with open("/dev/full", "wb") as f:
                f.write(b"x" * 4096)
                f.flush()
        elif what == "out of memory":
            np.empty(1 << 60, dtype=np.uint8)
        elif what == "slow":
            time.sleep(self.budget.case_limit_s + 0.5)
        name = f"rank{self.rank}_epoch{epoch}_{self.budget.tried}"
        (self.store.folder / name).write_text("case")
        return name


def _rank_main(rank: int, world: int, port: int, cases: int, steps: int, epochs: int, plan: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    logs: list[str] = []
    producer = FileProducer(TrainerSettings(mode="online", online_cases_per_epoch=cases).validate(), rank, world,
                            Path(out), plan, logs.append)
    per_step, epochs_out = [], []
    for epoch in range(epochs):
        producer.epoch_start()
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            gradient = torch.ones(8)
            dist.all_reduce(gradient)   # DDP's gradient sync: every rank waits for the slowest
            tried = producer.budget.tried
            producer.after_step(time.perf_counter() - t0, step, steps, epoch)
            per_step.append(producer.budget.tried - tried)
        figures = producer.epoch_figures()
        summed = torch.tensor(list(figures.values()), dtype=torch.float64)
        dist.all_reduce(summed)   # as the trainer sums the epoch's figures
        total = dict(zip(figures, summed.tolist()))
        epochs_out.append({"mine": figures, "total": total,
                           "warning": unreachable(int(total["produced"]), int(total["failed"]), cases)})
    dist.barrier()
    Path(out, f"result_{rank}.json").write_text(json.dumps({
        "share": producer.budget.share, "limit": producer.budget.case_limit_s, "stopped": producer.budget.stopped,
        "per_step": per_step, "epochs": epochs_out, "logs": logs}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, world: int, cases: int, steps: int, epochs: int, plan: dict) -> list[dict]:
    out = tmp_path / f"world{world}"
    out.mkdir()
    tmp.spawn(_rank_main, args=(world, _free_port(), cases, steps, epochs, plan, str(out)), nprocs=world, join=True)
    return [json.loads((out / f"result_{r}.json").read_text()) for r in range(world)]


def test_rank_shares_sum_to_the_budget_and_a_rank_without_one_is_idle():
    assert [rank_share(3, 4, r) for r in range(4)] == [1, 1, 1, 0]
    assert [rank_share(5, 2, r) for r in range(2)] == [3, 2]
    assert all(sum(rank_share(n, w, r) for r in range(w)) == n for n in range(10) for w in range(1, 9))
    idle = RankBudget(4, rank=7, world_size=8)
    assert idle.share == 0 and idle.idle and not any(idle.case_due(i, 10) for i in range(1, 11))


def test_budget_spreads_one_case_per_step_and_keeps_the_time_share():
    budget = RankBudget(5)
    made = []
    for step in range(1, 11):
        if budget.case_due(step, 10):
            budget.record(1.0, ok=True)
        made.append(budget.made)
    assert made == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5], "the share, spread over the epoch"
    budget = RankBudget(12)
    for step in range(1, 5):
        budget.add_step(1.0)
        assert budget.case_due(step, 4)
        budget.record(1.0, ok=True)
        assert not budget.case_due(step, 4), "one case per training step at most"
    assert budget.made == 4 and "unreachable" in unreachable(4, 0, 12)
    budget = RankBudget(0, time_share=0.2)   # only the time share limits
    for step in range(1, 21):
        budget.add_step(1.0)
        if budget.case_due(step, 20):
            budget.record(1.0, ok=True)
    assert budget.made == 5 and budget.synthesis_time <= 0.2 * (budget.synthesis_time + 20)


def test_a_failed_case_is_logged_and_skipped_and_a_too_slow_one_stops_the_rank():
    budget, logs = RankBudget(3, case_limit_s=0.05), []
    assert budget.attempt(lambda: np.empty(1 << 60, dtype=np.uint8), logs.append) is None
    assert budget.failed == 1 and "MemoryError" in logs[0] and "skipped" in logs[0]
    assert budget.attempt(lambda: "case", logs.append) == "case" and budget.made == 1
    assert budget.attempt(lambda: time.sleep(0.1) or "slow case", logs.append) == "slow case"
    assert budget.stopped and not budget.case_due(3, 3) and "makes no more cases" in logs[-1]
    assert unreachable(2, 1, 3) and unreachable(3, 0, 3) is None and unreachable(1, 0, None) is None


def _made_files(tmp_path: Path, world: int) -> list[str]:
    return sorted(p.name for p in (tmp_path / f"world{world}").glob("rank*"))


def test_four_ranks_with_three_cases_per_epoch_one_rank_idle_and_a_full_disk(tmp_path):
    results = run_ranks(tmp_path, 4, cases=3, steps=6, epochs=2, plan={"1/0/0": "disk full"})
    assert [r["share"] for r in results] == [1, 1, 1, 0]
    assert all(r["limit"] == TIMEOUT_S / 2 for r in results), "the limit is half the process group's timeout"
    assert all(max(r["per_step"]) <= 1 for r in results) and results[3]["per_step"] == [0] * 12
    assert _made_files(tmp_path, 4) == ["rank0_epoch0_0", "rank0_epoch1_0", "rank1_epoch1_0", "rank2_epoch0_0",
                                        "rank2_epoch1_0"], "the idle rank made nothing; the failed case is skipped"
    first, second = results[0]["epochs"]
    assert (first["total"]["produced"], first["total"]["failed"], first["total"]["target"]) == (2, 1, 3)
    assert "unreachable" in first["warning"] and second["warning"] is None and second["total"]["produced"] == 3
    assert any("OSError" in line and "skipped" in line for line in results[1]["logs"])


def test_two_ranks_out_of_memory_and_a_case_slower_than_half_the_timeout(tmp_path):
    results = run_ranks(tmp_path, 2, cases=5, steps=4, epochs=2, plan={"0/0/1": "out of memory", "1/0/0": "slow"})
    assert [r["share"] for r in results] == [3, 2]
    assert all(max(r["per_step"]) <= 1 for r in results)
    assert results[0]["stopped"] is None and "MemoryError" in " ".join(results[0]["logs"])
    assert results[1]["stopped"] and results[1]["per_step"][1:] == [0] * 7, "the slow rank made no more cases"
    assert [e["total"]["produced"] for e in results[0]["epochs"]] == [3, 3]   # 2 + the slow one; then rank 0's 3
    assert _made_files(tmp_path, 2) == ["rank0_epoch0_0", "rank0_epoch0_2", "rank0_epoch1_0", "rank0_epoch1_1",
                                        "rank0_epoch1_2", "rank1_epoch0_0"]
