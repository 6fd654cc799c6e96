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

``method.mode: adapter`` is MUSCLE's setting (the stream's versions carry ``base``, see
lethe/scenarios/model_update.py): version k's pretrained base is built from its payload
(and pretrained in the run first when ``pretrain_epochs > 0``), frozen, and gets a fresh
task LoRA adapter (LoRA's B = 0: training starts from the base's own outputs) on every
nn.Linear / nn.Conv2d; only the adapter trains, over the fixed task data. The deployed model
is base_k + adapter_k, unmerged (the served form: a frozen base carrying its task adapter),
and it is the ``old_model`` of version k + 1.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from lethe.errors import ConfigError, RunError
from lethe.methods.base import Method

MODES = ("full", "adapter")


@dataclass
class UpdateConfig:
    """Keys every update method with a version (adapter) mode shares."""

    mode: str = "full"            # full: each version trains a whole network | adapter: each
                                  # version is a frozen base (scenario.versions[i].base) with
                                  # a task LoRA adapter (MUSCLE's setting)
    rank: int = 8                 # LoRA rank of the adapters (choice)
    lora_alpha: float = 16.0      # LoRA scale numerator: update = (alpha / rank) · B A (choice)
    lora_dropout: float = 0.0     # dropout on the adapters' input


def lora_config(model, cfg):
    """peft LoraConfig on every nn.Linear / nn.Conv2d with the method's rank / alpha / dropout."""
    import re

    from peft import LoraConfig

    from lethe.models.lora import lora_targets

    names = lora_targets(model, None)   # every nn.Linear / nn.Conv2d, the head's too
    # a regex is matched against whole module names, so '1' cannot also hit 'block.1'
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.lora_alpha),
                      lora_dropout=float(cfg.lora_dropout), target_modules=pattern, bias="none")


def with_task_adapter(base, cfg):
    """``base`` (modified in place) frozen, with a fresh LoRA adapter injected into its layers
    (no wrapper class: the module keeps its type and forward); only ``.lora_`` params train."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config(base, cfg), base)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def stream_mode(stream) -> str:
    """adapter when the stream's update versions carry a base (version mode), else full."""
    ups = [e for e in stream.experiences if e.kind == "update"]
    return "adapter" if ups and ups[0].payload.get("base") is not None else "full"


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

    @classmethod
    def check_stream(cls, cfg, stream, seed: int) -> None:
        mode = getattr(cfg, "mode", "full")
        if mode not in MODES:
            raise ConfigError(f"method.mode='{mode}' must be one of {', '.join(MODES)}")
        want = stream_mode(stream)
        if want == mode:
            return
        if not hasattr(cfg, "mode"):
            raise ConfigError(f"method '{cls.name}' has no version (adapter) mode: "
                              "scenario.versions[i].base needs naive_update or muscle")
        if want == "adapter":
            raise ConfigError("scenario.versions[i].base is set (version mode: frozen bases with "
                              "task adapters) but method.mode=full; set method.mode: adapter")
        raise ConfigError("method.mode=adapter trains task adapters on frozen bases: give every "
                          "version one with scenario.versions[i].base: {name: ..., path: ...}")

    def __init__(self, cfg, model, ctx):
        # The top-level `model` node is version 0's architecture unless its payload names one;
        # keep an untrained copy to build later versions that inherit that architecture.
        self._top_level = copy.deepcopy(model)
        self.version = -1            # deployed version (-1: none yet)
        self.old_model = None        # frozen previous version while a new one trains
        self.adapter_mode = getattr(cfg, "mode", "full") == "adapter"
        self.pretraining = False     # True while a version-mode base pretrains (no method loss)
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

    def _payload(self, k: int) -> dict:
        return next(e.payload for e in self.ctx.stream.experiences
                    if e.kind == "update" and e.payload.get("version") == k)

    def _build(self, spec):
        """A network from a model node (dict with ``name``)."""
        from omegaconf import OmegaConf

        from lethe import registry
        from lethe.models.vision import ModelInfo

        node = OmegaConf.create(dict(spec))
        name = node.pop("name")
        stream = self.ctx.stream
        info = ModelInfo(input_shape=stream.input_shape, n_classes=stream.n_classes)
        return registry.get("models", name).obj(node, info)

    def build_version(self, k: int):
        """A freshly initialised network with version k's architecture (version mode: its
        base as built from the node, with a fresh task adapter)."""
        if self.adapter_mode:
            return with_task_adapter(self._build(self._payload(k)["base"]), self.cfg)
        spec = self._spec(k)
        if spec is None:
            return reinitialise(self._top_level)
        return self._build(spec)

    def _pretrained_base(self, payload: dict):
        """Version mode: the payload's base, pretrained in the run (all weights, the template's
        cross-entropy only) when it names a pretraining set; then frozen with a task adapter."""
        base = self._build(payload["base"])
        if payload.get("pretrain") is not None:
            self.use_model(base, int(payload["pretrain_epochs"]))
            self.pretraining = True
            try:
                self.strategy.train(payload["pretrain"], num_workers=self.ctx.train.num_workers)
            finally:
                self.pretraining = False
            base = self.model
        return with_task_adapter(base, self.cfg)

    def _new_version_model(self, payload: dict):
        if self.adapter_mode:
            return self._pretrained_base(payload)
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

    def method_loss_active(self, strategy) -> bool:
        """Whether a subclass's extra loss applies to this minibatch: a previous version exists,
        the template trains the deployed model, and no version-mode base is pretraining."""
        return self.old_model is not None and strategy.model is self.model and not self.pretraining

    def before_training_epoch(self, strategy, **kwargs):
        # a frozen base's normalisation statistics must not drift under its adapter either
        if self.adapter_mode and not self.pretraining:
            from lethe.models.lora import freeze_norm_stats

            freeze_norm_stats(strategy.model)

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
