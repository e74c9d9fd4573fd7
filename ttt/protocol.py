"""Evaluation protocols of the stream: `offline` (every batch adapted on, today's default) and
`online` (Alfarra et al., ICML 2024: the stream does not wait for a slow method), and RDumb's
periodic reset (`ttt.reset_every`, Press et al. 2023). Pure Python, no Ray, no torch.

The online protocol follows MotasemAlfarra/Online_Test_Time_Adaptation `utils/online_eval.py`
(`delayed_eval_online`): the stream reveals a batch every `1 / (eta * r)` seconds, r the speed
of the source model's forward. When the method is free (`delay == 0`) it adapts on the batch and
predicts it; its adaptation cost k (the time of the method's step on the batch divided by the
time of the plain forward of the same network on it) makes it busy for the next
`max(0, ceil(k * eta) - 1)` batches, which are predicted by the current model without an update
(`model.model` there: the adapted network, no optimiser step). The reference times both passes
on every batch on a GPU (`torch.cuda.synchronize`), which makes the skipped batches depend on
the machine's timing noise; `utils/compute_average_complexity.py` times them on random batches
and takes the median. Here k comes from a fixed cost table (`ttt.online.costs`, method -> k;
recorded in run.json with the resolved config) so a run is deterministic and a CPU run can
simulate a GPU's ratios; `bench/online_costs.py` measures a machine's ratios the reference's way
(median over batches of step time / source forward time) and prints them as `--set` overrides.
`ttt.online.cost: passes` instead takes k from the forward / backward passes the method's step
actually made on the batch (forward = 1, backward = 2 forwards, per sample, relative to one
forward of the batch), which is also deterministic and follows a method whose cost varies from
batch to batch (CoTTA augments only when its anchor is unsure).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# Each method's step relative to one forward of the batch, counting a backward as two forwards
# (the usual FLOP ratio) and the passes each reference makes per batch: tent/eata/deyo one forward
# + one backward (+ DeYO's shuffled forward), SAR two of each (SAM), MIM the masked forward +
# backward + its decoder, CoTTA student forward + backward, anchor, teacher and 32 augmented teacher
# forwards, RoTTA a teacher forward of the batch plus a teacher forward and a student forward +
# backward of as many memory samples, ROID forwards of the batch and of its augmented view with
# backward through both, LAME one forward (its Laplacian is negligible: the reference's online and
# offline LAME errors are equal), nn a retrieval plus k neighbours' fine-tuning (set it for your k).
DEFAULT_COSTS: dict[str, float] = {
    "source": 1.0, "norm": 1.0, "lame": 1.0, "tent": 3.0, "eata": 3.0, "deyo": 4.0, "sar": 6.0,
    "mim": 4.0, "cotta": 37.0, "rotta": 5.0, "roid": 6.0, "nn": 25.0,
}


class OnlineConfig(BaseModel):
    """`ttt.protocol: online`: the stream's speed and each method's cost (module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    eta: float = Field(1.0, ge=0.0, le=1.0)  # stream speed relative to the source forward (0 = waits, offline)
    cost: Literal["table", "passes"] = "table"  # where k comes from
    costs: dict[str, Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = Field(default_factory=lambda: dict(DEFAULT_COSTS))  # method -> k (>= 0)
    default_cost: float = Field(1.0, ge=0.0)  # k of a method missing from `costs`


def method_cost(online: OnlineConfig, method: str) -> float:
    """k for `method` from the cost table."""
    return float(online.costs.get(method, online.default_cost))


def busy_batches(cost: float, eta: float) -> int:
    """Batches that arrive while a step of relative cost `cost` runs at stream speed `eta`, which
    the method cannot adapt on: max(0, ceil(cost * eta) - 1), as the reference's `delay`. The
    product is rounded to 9 decimals first so 0.1 * 30 counts as 3, not 3.0000000000000004."""
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"online cost must be a finite number >= 0, got {cost}")
    return max(0, math.ceil(round(cost * eta, 9)) - 1)


def adapted_schedule(n_batches: int, cost: float, eta: float) -> list[bool]:
    """Which of `n_batches` consecutive batches a method with a fixed `cost` adapts on (True)
    from a free start: what the stream does with a cost table, batch by batch."""
    out, delay = [], 0
    for _ in range(n_batches):
        if delay == 0:
            out.append(True)
            delay = busy_batches(cost, eta)
        else:
            out.append(False)
            delay -= 1
    return out


def passes_cost(forward_rows: float, backward_rows: float, batch_rows: int) -> float:
    """k from a step's counted passes: (forward rows + 2 x backward rows) / the batch's rows."""
    return (forward_rows + 2.0 * backward_rows) / max(1, batch_rows)
