"""What every training loop of the project shares: seeding, the learning-rate schedule, a progress bar with
periodic evaluation, resumable checkpoints, and the final safetensors + JSON export.

Determinism: a run is a function of its seed and step count. Data comes from
:mod:`edgefm.runtime.shapes` by ``(seed, index)``, and every random choice of step ``s`` is drawn from a
generator seeded with ``(seed, s)``, so a run resumed from ``checkpoint.pt`` continues exactly where it
stopped (up to the non-determinism of threaded CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seed torch and numpy's legacy global state and pin the number of CPU threads."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.set_num_threads(threads)


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one training step (independent of how the run was interrupted)."""
    return np.random.default_rng([seed, 7919, stream, step])


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine decay to 5% of ``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def add_common_args(parser: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    """The arguments every loop takes: output folder, schedule, wall-clock budget, seed, evaluation."""
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoint.pt, log, weights)")
    parser.add_argument("--steps", type=int, default=steps, help="schedule length in optimizer steps")
    parser.add_argument("--batch", type=int, default=batch, help="images per step")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data stream and of the init")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget: save and stop after it; rerun the same command to resume")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between evaluations")
    parser.add_argument("--eval-n", type=int, default=None, help="held-out samples per evaluation")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    # one thread: on a small shared machine, two threads were several times slower than one
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--weights", type=Path, default=None,
                        help="where to write the final .safetensors (its .json goes beside it)")


@dataclass
class Trainer:
    """Runs ``step_fn(step) -> dict of floats`` from the checkpointed step to ``total``.

    ``eval_fn() -> dict of floats`` runs every ``eval_every`` steps and at the end; both the model and
    the optimizer states (and the log) are saved every ``save_every`` steps, on budget exhaustion and at
    the end, atomically, in ``out/checkpoint.pt``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    out: Path
    total: int
    eval_every: int = 200
    save_every: int = 100
    minutes: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.log = int(state["step"]), json.loads(state["log"])
            print(f"resumed {path} at step {self.step}", file=sys.stderr)

    def save(self) -> None:
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step, "log": json.dumps(self.log)}, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def run(self, step_fn: Callable[[int], dict[str, float]], eval_fn: Callable[[], dict[str, float]]) -> bool:
        """Train; returns True when the schedule is complete, False when the wall-clock budget ran out."""
        start = time.monotonic()
        bar = tqdm(total=self.total, initial=self.step, dynamic_ncols=True, mininterval=2.0)
        smooth: dict[str, float] = {}
        while self.step < self.total:
            self.model.train()
            stats = step_fn(self.step)
            self.step += 1
            smooth = {k: v if k not in smooth else 0.95 * smooth[k] + 0.05 * v for k, v in stats.items()}
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in smooth.items()}, refresh=False)
            if self.step % self.eval_every == 0 or self.step == self.total:
                self.evaluate(eval_fn, smooth, bar)
            if self.step % self.save_every == 0 or self.step == self.total:
                self.save()
            if self.minutes is not None and time.monotonic() - start > 60 * self.minutes and self.step < self.total:
                self.save()
                bar.close()
                print(f"budget of {self.minutes} min spent at step {self.step}/{self.total}; "
                      "rerun the same command to resume", file=sys.stderr)
                return False
        bar.close()
        return True

    def evaluate(self, eval_fn: Callable[[], dict[str, float]], train_stats: dict[str, float],
                 bar: tqdm | None = None) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = eval_fn()
        self.log.append({"step": self.step, "time": time.time(), **{f"train_{k}": v for k, v in train_stats.items()},
                         **metrics})
        line = f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        (bar.write if bar is not None else print)(line)
        return metrics


def export_weights(model: nn.Module, path: Path, config: dict[str, Any], half: bool = True) -> Path:
    """Write ``model``'s state dict to ``path`` (.safetensors; floating tensors as fp16 when ``half``, which
    the loaders cast back to fp32) and ``config`` plus the command line to ``path`` with suffix .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    meta = {**config, "command": "python -m " + " ".join(shlex.quote(a) for a in _argv())}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return path


def _argv() -> list[str]:
    # "python -m edgefm.models.train.clip ..." as typed, whatever sys.argv[0] the -m launcher left
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else None
    return [module or sys.argv[0], *sys.argv[1:]]
