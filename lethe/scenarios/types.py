"""Experience and stream types shared by scenarios, methods and the runner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LEARN, FORGET, UPDATE = "learn", "forget", "update"


@dataclass
class ForgetRequest:
    """A deletion request: training samples named by their stable ids."""

    sample_ids: Any          # 1-D int64 tensor of ids
    after: int               # index of the learn experience the request follows


@dataclass
class Experience:
    """One step of a lethe stream (the MLflow step of everything logged after it)."""

    index: int
    kind: str                # learn | forget | update
    train: Any = None        # Avalanche experience (learn)
    request: ForgetRequest | None = None   # forget
    payload: dict = field(default_factory=dict)  # update: what the new version gets


@dataclass
class TestSet:
    """Test data of all evaluation experiences, preloaded as tensors (CPU)."""

    x: Any                   # float tensor [N, ...]
    y: Any                   # int64 [N]
    exp: Any                 # int64 [N]: which experience each sample belongs to
    task: Any                # int64 [N]: task label (0 when class-incremental)
    ids: Any                 # int64 [N]: stable sample ids

    @property
    def n_experiences(self) -> int:
        return int(self.exp.max()) + 1 if len(self.exp) else 0


@dataclass
class Stream:
    """What a scenario builder returns."""

    experiences: list[Experience]
    benchmark: Any           # the Avalanche benchmark behind the learn experiences
    test: TestSet
    input_shape: tuple
    n_classes: int
    setting: str             # "class_incremental" | "task_incremental" | "domain_incremental"
    class_order: list = field(default_factory=list)
    # training samples of the learn experiences as tensors (exp = learn position): the
    # forget/retain pools of deletion requests; None = built on demand (scenarios/forget.py)
    train: TestSet | None = None
    # non-deletable public training data in no experience (e.g. split_digits.public_fraction):
    # what a frozen backbone of an exact-unlearning method may be pretrained on
    public: TestSet | None = None
    # "classification" (x → class logits) | "lm" (x = token blocks [N, L+1]; next-token
    # prediction, evaluated by lethe.metrics.lm.LMEvaluator: held-out loss / perplexity)
    task_type: str = "classification"

    @property
    def kinds(self) -> set[str]:
        return {e.kind for e in self.experiences}

    @property
    def n_eval_experiences(self) -> int:
        return self.test.n_experiences
