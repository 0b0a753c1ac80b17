"""Wall time of a full run projected from measured rates: the one formula the user preflight
(src/pipeline/preflight.py) and the paper-scale bench (bench/scale.py) share.

A stage's hours = sum over the rounds of (its work units in a round x the seconds one unit
took at that round's rate) / the processes that share it. Round 0 runs the plain classifier
and rounds 1.. the CONTA one, so callers give a rate per (round, stage).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

Rate = Callable[[int, str], float]  # (round, stage) -> seconds per unit


def projected_hours(
    units: Mapping[str, float],
    seconds_per_unit: Rate,
    rounds: int,
    processes: Mapping[str, int] | int = 1,
) -> dict[str, float]:
    """{stage: hours} over rounds 0..rounds-1 for `units[stage]` units a round."""
    hours = {}
    for stage, n in units.items():
        share = processes if isinstance(processes, int) else processes[stage]
        seconds = sum(n * seconds_per_unit(r, stage) for r in range(rounds))
        hours[stage] = seconds / max(1, share) / 3600
    return hours
