"""Model updates (compatibility / negative-flip training): the base class every update method
shares (``naive_update``, ``pct``, ``muscle``).

Setting (Yan et al., "Positive-Congruent Training", CVPR 2021; Echterhoff et al., "MUSCLE",
2024): a deployed model f₁ is replaced by a new version f₂ trained on more data and/or with
another architecture, and the methods differ in how f₂ is trained (lethe/methods/naive_update.py,
pct.py, muscle.py).

An update experience (scenario ``model_update``) carries ``payload = {version, model,
fraction, epochs, init, n_train}``: the method builds the new version's network (``model``:
a model node; None = the previous version's architecture), trains it on the experience's
data and deploys it. The deployed model is ``self.model``; while a version trains,
``self.old_model`` is a frozen copy of the previous one (None for version 0).
"""
from __future__ import annotations

import copy

from lethe.errors import RunError
from lethe.methods.base import Method


def frozen_copy(model):
    """An eval-mode copy without gradients (the teacher of a distillation)."""
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


def reinitialise(model):
    """A copy of ``model`` with fresh parameters (every module's ``reset_parameters``)."""
    new = copy.deepcopy(model)
    for m in new.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return new


class UpdateMethod(Method):
    """Base of the update methods: builds each version, trains it, deploys it.

    Subclasses override :meth:`train_version` (the default trains with the template's
    cross-entropy plus whatever the subclass's Avalanche callbacks add).
    """

    def __init__(self, cfg, model, ctx):
        # The top-level `model` node is version 0's architecture unless its payload names one;
        # keep an untrained copy to build later versions that inherit that architecture.
        self._top_level = copy.deepcopy(model)
        self.version = -1            # deployed version (-1: none yet)
        self.old_model = None        # frozen previous version while a new one trains
        super().__init__(cfg, model, ctx)

    # --- versions -----------------------------------------------------------------------
    def _spec(self, k: int):
        """Model node of version k after inheritance (None = the top-level model)."""
        by_version = {e.payload.get("version"): e.payload for e in self.ctx.stream.experiences
                      if e.kind == "update"}
        for j in range(k, -1, -1):
            p = by_version.get(j, {})
            if p.get("model") is not None:
                return p["model"]
        return None

    def build_version(self, k: int):
        """A freshly initialised network with version k's architecture."""
        from omegaconf import OmegaConf

        from lethe import registry
        from lethe.models.vision import ModelInfo

        spec = self._spec(k)
        if spec is None:
            return reinitialise(self._top_level)
        node = OmegaConf.create(dict(spec))
        name = node.pop("name")
        stream = self.ctx.stream
        info = ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes)
        return registry.get("models", name).obj(node, info)

    def _new_version_model(self, payload: dict):
        k = int(payload["version"])
        if payload.get("init") == "previous":
            if self.version < 0:
                raise RunError(f"version {k} has init=previous but no version is deployed yet")
            return copy.deepcopy(self.model)
        if k == 0 and payload.get("model") is None and self.version < 0:
            return self.model        # the runner-built (seeded) top-level model
        return self.build_version(k)

    def use_model(self, model, epochs: int | None = None) -> None:
        """Make ``model`` the one the template trains, with a fresh optimizer. The template's
        clock carries over so train/loss keeps one iteration axis across versions."""
        clock = {k: v for k, v in vars(self.strategy.clock).items() if isinstance(v, int)}
        self.model = self.engine.prepare_model(model.to(self.ctx.device))
        self.strategy = self.build_strategy()
        for k, v in clock.items():
            setattr(self.strategy.clock, k, v)
        if epochs:
            self.strategy.train_epochs = int(epochs)

    # --- serving update experiences -----------------------------------------------------
    def update(self, experience) -> None:
        payload = experience.payload
        if "version" not in payload:
            raise RunError(f"update experience {experience.index} has no 'version' in its payload "
                           "(use the model_update scenario)")
        epochs = int(payload.get("epochs") or 0) or self.ctx.train.epochs
        self.old_model = frozen_copy(self.model).to(self.ctx.device) if self.version >= 0 else None
        try:
            self.use_model(self._new_version_model(payload), epochs)
            self.train_version(experience, epochs)
        finally:
            self.old_model = None
        self.version = int(payload["version"])

    def train_version(self, experience, epochs: int) -> None:
        self.strategy.train(experience.train, num_workers=self.ctx.train.num_workers)

    # --- checkpoints --------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"version": int(self.version)}

    def load_extra_state(self, state: dict) -> None:
        self.version = int(state["version"])

    def load_state_dict(self, state: dict) -> None:
        # The saved weights are those of the deployed version: rebuild its architecture
        # (and a matching optimizer) before loading them.
        k = int(state["extra"]["version"])
        if k >= 0:
            self.use_model(self.build_version(k))
        super().load_state_dict(state)
