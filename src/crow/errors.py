"""User-facing errors. The CLI prints ``CrowError`` as one line and exits with code 2."""

from __future__ import annotations


class CrowError(ValueError):
    """A problem with the user's input or options: the message says what is wrong and what to do."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; nothing was written."""

    exit_code = 3

    def __init__(self, step: int, value: float, last_finite: list[float]):
        recent = ", ".join(f"{x:.4g}" for x in last_finite) or "none"
        super().__init__(f"training stopped: the loss was {value} at optimizer step {step} (last finite losses: "
                         f"{recent}); nothing was written. Lower the learning rate or alpha, or check the data")
        self.step, self.value, self.last_finite = step, value, list(last_finite)


class Interrupted(RuntimeError):
    """Training was stopped by a signal after a checkpoint was saved; ``--resume`` continues it."""

    exit_code = 130
