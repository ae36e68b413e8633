"""RePaint jump (resampling) time lists and their strided variant.

A time list starts at ``T-1`` and ends at ``-1`` (the clean image); consecutive pairs are the steps.
A step down (t -> t-1) is one network evaluation, a step up (t -> t+1) is a re-noising "undo" step.
"""
from __future__ import annotations

import math

from nnunet_lefusion.errors import LeFusionError


def jump_schedule(num_steps: int, jump_length: int = 5, jump_n_sample: int = 5, jump_below: float = 1.0) -> list[int]:
    """The official LeFusion/RePaint time list (``get_schedule_jump`` with n_sample=1, jump2/jump3 off).

    Walking down from ``num_steps - 1``, at every t in {0, jl, 2 jl, ...} below ``num_steps - jl`` the path
    goes back up ``jump_length`` steps, ``jump_n_sample - 1`` times in all, before it continues down to -1.
    ``jump_below`` < 1 keeps only the jump points t < jump_below * (num_steps - 1), the low-noise end
    (1, the default, is the official list).
    """
    if num_steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise LeFusionError(
            f"jump schedule needs num_steps, jump_length and jump_n_sample >= 1, got "
            f"{num_steps}/{jump_length}/{jump_n_sample}.")
    jumps_left = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)
                  if j < jump_below * (num_steps - 1)}
    times = [num_steps]
    t = num_steps
    while t > 0:
        t -= 1
        times.append(t)
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            times.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    times.append(-1)
    return times[1:]


def count_evaluations(times: list[int]) -> int:
    """Network evaluations of a time list: the number of downward steps."""
    return sum(1 for a, b in zip(times[:-1], times[1:]) if b < a)


def expected_evaluations(num_steps: int, jump_length: int, jump_n_sample: int) -> int:
    """Closed form T + (jn - 1) * jl * ceil((T - jl) / jl) of the official jump schedule's evaluations."""
    jump_points = max(0, math.ceil((num_steps - jump_length) / jump_length))
    return num_steps + (jump_n_sample - 1) * jump_length * jump_points


def strided_timesteps(num_steps: int, num_strided: int, power: float = 1.0) -> list[int]:
    """Increasing timesteps round((num_steps - 1) * (i / (num_strided - 1)) ** power), i < ``num_strided``:
    both ends included, evenly spread for ``power`` 1, denser at low noise for ``power`` > 1 (repeats after
    rounding are dropped, so there may be fewer than ``num_strided``)."""
    if not 1 <= num_strided <= num_steps:
        raise LeFusionError(f"the number of strided steps must be in [1, {num_steps}], got {num_strided}.")
    if power <= 0:
        raise LeFusionError(f"the timestep spacing power must be > 0, got {power}.")
    if num_strided == 1:
        return [num_steps - 1]
    return sorted({round((num_steps - 1) * i ** power / (num_strided - 1) ** power) for i in range(num_strided)})


def strided_jump_schedule(num_steps: int, num_strided: int, jump_length: int, jump_n_sample: int,
                          power: float = 1.0, jump_below: float = 1.0) -> list[int]:
    """The jump schedule walked on the strided timesteps (``strided_timesteps``) instead of all ``num_steps``.

    The index path of ``jump_schedule(len(taus), jl, jn, jump_below)`` is mapped to real timesteps (index -1
    stays -1), so each step moves between neighbouring strided timesteps (DDIM-style down, re-noising up).
    """
    taus = strided_timesteps(num_steps, num_strided, power)
    return [-1 if i < 0 else taus[i] for i in jump_schedule(len(taus), jump_length, jump_n_sample, jump_below)]
