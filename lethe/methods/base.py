"""The method interface every lethe method implements.

A method owns the model and an Avalanche training template. It serves the experiences of
the stream (``learn``; ``unlearn`` and ``update`` where it registered those kinds), says how
to predict when inference is not a plain forward, and saves/restores its state for
checkpoints. Callbacks named like Avalanche's (``before_training_exp``, ``after_backward``,
...) defined on a method subclass are called by the template: the method object is itself
passed as a plugin (Avalanche calls plugins by duck typing), so method files need not import
Avalanche at module level and ``lethe list`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lethe.engine.loop import make_optimizer  # noqa: F401 - methods import it from here too
from lethe.errors import RunError


@dataclass
class MethodContext:
    """What the runner hands a method."""

    train: Any                     # TrainConfig node
    device: Any                    # torch.device
    stream: Any                    # lethe Stream
    seed: int = 0
    plugins: list = field(default_factory=list)  # runner plugins (progress, NaN check, lr log)
    evaluator: Any = None          # Avalanche EvaluationPlugin forwarding to MLflow


class Method:
    """Base class: plain fine-tuning with Avalanche's SupervisedTemplate."""

    name = "method"
    # why the method cannot train in several processes ("" = it can): said at config time
    # for --nproc N and multi-task SLURM jobs (lethe.platform.runner.check_distributable)
    not_distributable = ""
    # whether the method trains under distributed.strategy=fsdp (sharded weights): only those
    # tested sharded, whose model changes (if at all) through LLMUnlearner.edit_lm, which
    # rebuilds a sharded model around new modules (adapters)
    fsdp = False

    def __init__(self, cfg, model, ctx: MethodContext):
        from lethe.engine.engine import Engine

        self.cfg = cfg
        self.ctx = ctx
        self.engine = Engine(ctx.train, ctx.device)   # precision, accumulation, clipping
        self.model = self.engine.prepare_model(self.setup(model).to(ctx.device))
        self.strategy = self.build_strategy()
        self.learned: list[int] = []   # stream indices of the learn experiences served

    # --- construction -------------------------------------------------------------------
    def setup(self, model):
        """Model surgery before training (freezing, adapters). Returns the model to train."""
        return model

    def plugins(self) -> list:
        """Avalanche plugins of the method (the method itself is always added)."""
        return []

    def strategy_class(self):
        from avalanche.training.templates import SupervisedTemplate

        return SupervisedTemplate

    def strategy_kwargs(self) -> dict:
        return {}

    def build_strategy(self):
        import torch

        from lethe.engine.template import engine_template

        train = self.ctx.train
        strategy = engine_template(self.strategy_class())(
            model=self.model, optimizer=make_optimizer(self.model.parameters(), train),
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=train.batch_size,
            train_epochs=train.epochs, eval_mb_size=max(train.batch_size, 256),
            device=self.ctx.device, plugins=[*self.plugins(), self, *self.ctx.plugins],
            evaluator=self.ctx.evaluator, **self.strategy_kwargs())
        strategy.engine = self.engine
        return strategy

    @classmethod
    def check_stream(cls, cfg, stream, seed: int) -> None:
        """Method-specific limits of a stream, checked before any training (ConfigError), e.g.
        a deletion request that would empty a SISA shard. Nothing by default."""

    # --- serving experiences ------------------------------------------------------------
    def serve(self, experience) -> None:
        """Serve one experience of the stream by its kind (learn, forget or update)."""
        if experience.kind == "learn":
            self.learn(experience)
        elif experience.kind == "forget":
            self.unlearn(experience.request)
        elif experience.kind == "update":
            self.update(experience)
        else:
            raise RunError(f"unknown experience kind '{experience.kind}'")

    def learn(self, experience) -> None:
        # eval_streams=[]: lethe evaluates through its own evaluator; Avalanche's default
        # (evaluate on the training experiences, which its periodic eval never does unasked)
        # only sorted them by stream name, a per-experience cost for nothing
        self.strategy.train(experience.train, eval_streams=[], num_workers=self.ctx.train.num_workers)
        self.learned.append(experience.index)

    def unlearn(self, request) -> None:
        raise RunError(f"method '{self.name}' cannot serve forget experiences")

    def update(self, experience) -> None:
        raise RunError(f"method '{self.name}' cannot serve update experiences")

    def predict(self, x, task_ids):
        """Logits for a batch; override for task-routed heads, ensembles, retrieval."""
        return self.model(x)

    @property
    def plain_predict(self) -> bool:
        """True when :meth:`predict` is the model's own forward (not overridden), so evaluators
        may use the model's faster paths (a language model's KV-cached ``generate``)."""
        return type(self).predict is Method.predict

    def unlearn_stats(self) -> dict:
        """The method's own cost numbers of the last deletion request (``serve_s``,
        ``retrain_samples``, ...), logged under ``unlearn/*``; empty by default."""
        return {}

    def log_params(self) -> dict:
        """Metrics about the method's parameters (e.g. params/trainable), logged by the runner
        at step 0 and after every experience; empty for methods with nothing to report."""
        return {}

    # --- checkpoints (state_dicts only: loadable with weights_only=True) ----------------
    def extra_state(self) -> dict:
        """Method state besides model and optimizer (replay buffer, importances, ...)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """The method's state. Under FSDP (sharded weights) model and optimizer are gathered
        whole, collectively: every rank calls this, rank 0 gets the single-process format
        (the others get empty model and optimizer entries and write nothing)."""
        from lethe.engine import distributed

        clock = {k: v for k, v in vars(self.strategy.clock).items() if isinstance(v, int)}
        if distributed.is_sharded(self.model):
            model = distributed.full_model_state(self.model)
            optimizer = distributed.full_optimizer_state(self.model, self.strategy.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.strategy.optimizer.state_dict()
        return {"model": model, "optimizer": optimizer, "clock": clock, "learned": list(self.learned),
                "extra": self.extra_state(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; under FSDP every rank holds the whole checkpoint and
        each keeps its shard of it."""
        from avalanche.models.dynamic_optimizers import update_optimizer

        from lethe.engine import distributed

        sharded = distributed.is_sharded(self.model)
        if sharded:
            distributed.load_full_model_state(self.model, state["model"])
        else:
            self.model.load_state_dict(state["model"])
        # Avalanche resets optimizer state (momentum) on its first make_optimizer call; do
        # that first call now, the way the original run did, then restore the saved state.
        self.strategy.optimized_param_id = update_optimizer(
            self.strategy.optimizer, dict(self.model.named_parameters()), None, reset_state=True)
        if sharded:
            distributed.load_full_optimizer_state(self.model, self.strategy.optimizer, state["optimizer"])
        else:
            self.strategy.optimizer.load_state_dict(state["optimizer"])
        for k, v in state["clock"].items():   # EWC & co. read the template's clock
            setattr(self.strategy.clock, k, v)
        self.learned = list(state["learned"])
        self.engine.load_state_dict(state.get("engine", {}))   # absent in older checkpoints
        self.load_extra_state(state["extra"])

    # --- helpers for subclasses ---------------------------------------------------------
    def learn_experiences(self) -> list:
        """The learn experiences served so far, in order."""
        by_index = {e.index: e for e in self.ctx.stream.experiences}
        return [by_index[i] for i in self.learned]
