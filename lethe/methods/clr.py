"""CLR — Channel-wise Lightweight Reprogramming (Ge et al., ICCV 2023).

Repo: gyhandy/Channel-wise-Lightweight-Reprogramming. A CNN is frozen once (the *anchor*).
After every conv whose kernel is larger than 1x1 (also 1x1 ones with ``wrap_1x1``) sits an
identity-initialised depthwise 3x3 conv, so a layer computes conv → CLR → BN → ReLU. Per
task only the CLR kernels, every BatchNorm layer (affine parameters and running statistics)
and a task head are trained; they are stashed when the task ends and swapped back in at test
time by task id (task-incremental). Loss: CE + λ·Σ‖W_clr‖² (λ = 1e-5), Adam, lr 1e-3.

A run should show: the anchor's weights bitwise unchanged after all tasks; every earlier
task's accuracy after the last task equal to its accuracy right after it was learned
(forgetting exactly 0); about 0.4% of ResNet-18's parameters trained and stored per task
(the paper: < 0.6%); accuracy far above naive fine-tuning. Logged: ``params/trainable``,
``params/frac_trainable``, ``params/stored_bytes_per_task``.

The anchor: the paper's is ImageNet-pretrained (give ``model.weights_path``). CLR's accuracy
rests on the anchor's features, so on small streams without pretrained weights
``anchor_pretrain: first_task`` trains the whole network briefly on the first task's data
before freezing it (that data belongs to the task being learned next, so no other task's
data is touched early; choice, see docs/methods.md).

Official schedule (main.py / dataloader_reader.py there): Resize((224, 224)) + ImageNet
mean/std for training and validation alike (no augmentation), batch 32, Adam 1e-3 with
StepLR(step_size = 60 // 3 = 20 epochs, γ = 0.1) stepped per epoch, 60 epochs, and per task
the epoch with the best validation accuracy kept; the preset ``paper/clr_cifar100`` sets all
of that (``eval.every_epochs: 1`` + ``checkpoint.select: best``). Deviation kept by default:
the official loss adds λ·Σ_p ‖p‖₂ (a norm, not squared) over every trained tensor (head,
BatchNorm, CLR kernels); lethe's default is the squared CLR-kernel term above, and
``l2_form: official`` gives the official one (the paper preset uses it).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from lethe.errors import ConfigError
from lethe.methods.base import Method
from lethe.registry import register_method

PRETRAIN = ("none", "first_task")
L2_FORMS = ("squared", "official")


@dataclass
class CLRConfig:
    wrap_1x1: bool = False          # CLR-Full variant: reprogram 1x1 convs too (ResNet downsample)
    l2: float = 1e-5                # λ of the λ·Σ‖W_clr‖² term on the CLR kernels (paper)
    # squared: λ·Σ‖W_clr‖² over the CLR kernels (as written above) | official: the official
    # train(): λ·Σ_p ‖p‖₂ (a norm, not squared) over every trained tensor: CLR kernels,
    # BatchNorm and head (zero-norm tensors skipped, as there)
    l2_form: str = "squared"
    anchor_pretrain: str = "none"   # none (anchor as built/loaded) | first_task (train it
                                    # on the first task's data, then freeze; small settings)
    anchor_pretrain_epochs: int = 10  # epochs of that pre-training
    anchor_pretrain_lr: float = 1e-3  # Adam lr of that pre-training


@functools.cache
def _layers():
    """The CLR wrapper and task head (built lazily: torch is a heavy import)."""
    import torch
    from torch import nn

    class CLRConv(nn.Module):
        """A frozen conv followed by a trainable depthwise 3x3 reprogramming conv."""

        def __init__(self, conv: nn.Conv2d):
            super().__init__()
            self.conv = conv
            c = conv.out_channels
            self.clr = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).to(conv.weight.device)
            self.reset()

        @torch.no_grad()
        def reset(self):
            """Identity kernels: the wrapped conv's output passes through unchanged."""
            self.clr.weight.zero_()
            self.clr.weight[:, 0, 1, 1] = 1.0

        def forward(self, x):
            return self.clr(self.conv(x))

    class TaskHead(nn.Module):
        """A linear head over one task's classes, writing into the stream's global logits
        (other classes get -inf, so a prediction always names one of the task's classes)."""

        def __init__(self, in_features: int, classes, n_out: int):
            super().__init__()
            self.linear = nn.Linear(in_features, len(classes))
            self.register_buffer("classes", torch.as_tensor(list(classes), dtype=torch.long))
            self.n_out = n_out

        @torch.no_grad()
        def reshape(self, classes):
            """Fresh weights for ``classes``. The Parameter objects stay the same (only their
            data is replaced), so the optimizer keeps pointing at them across tasks."""
            fresh = nn.Linear(self.linear.in_features, len(classes)).to(self.linear.weight.device)
            self.linear.weight.data = fresh.weight.data
            self.linear.bias.data = fresh.bias.data
            self.linear.out_features = len(classes)
            self.linear.weight.grad = self.linear.bias.grad = None
            self.classes = torch.as_tensor(list(classes), dtype=torch.long,
                                           device=self.classes.device)

        def forward(self, f):
            logits = self.linear(f)
            out = logits.new_full((f.shape[0], self.n_out), float("-inf"))
            return out.index_copy(1, self.classes, logits)

    return CLRConv, TaskHead


@register_method("clr", config=CLRConfig, kinds=("learn",), settings=("task_incremental",))
class CLR(Method):
    """Channel-wise lightweight reprogramming: frozen anchor + per-task depthwise kernels."""

    name = "clr"

    # --- surgery --------------------------------------------------------------------------
    def setup(self, model):
        from torch import nn

        CLRConv, TaskHead = _layers()
        if self.cfg.anchor_pretrain not in PRETRAIN:
            raise ConfigError(f"method.anchor_pretrain: '{self.cfg.anchor_pretrain}' must be one of "
                              f"{', '.join(PRETRAIN)}")
        if self.cfg.l2_form not in L2_FORMS:
            raise ConfigError(f"method.l2_form: '{self.cfg.l2_form}' must be one of "
                              f"{', '.join(L2_FORMS)}")
        self.base_params = sum(p.numel() for p in model.parameters())
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
                 and (tuple(m.kernel_size) != (1, 1) or self.cfg.wrap_1x1)]
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not convs or not linears:
            raise ConfigError("method clr needs a CNN with a linear head (model.name=simple_cnn or "
                              "resnet18): this model has no conv to reprogram or no linear head")
        self.head_name, last = linears[-1]
        n_out = int(self.ctx.stream.n_classes)
        model.set_submodule(self.head_name, TaskHead(last.in_features, range(n_out), n_out))
        for name, conv in convs:
            model.set_submodule(name, CLRConv(conv))
        for p in model.parameters():
            p.requires_grad_(False)
        for m in self._task_modules(model):
            for p in (m.clr.parameters() if isinstance(m, CLRConv) else m.parameters()):
                p.requires_grad_(True)
        self.task_keys = self._keys_of(model)
        self.anchor_bn = self._bn_state(model)
        self.stash: dict[int, dict] = {}       # task id -> its CLR kernels, BN state, head
        self.pretrained = self.cfg.anchor_pretrain == "none"
        return model

    def _task_modules(self, model):
        from torch.nn.modules.batchnorm import _BatchNorm

        CLRConv, TaskHead = _layers()
        return [m for m in model.modules() if isinstance(m, (CLRConv, TaskHead, _BatchNorm))]

    def _keys_of(self, model) -> list[str]:
        """State-dict keys that belong to a task (CLR kernels, BatchNorm, head)."""
        from torch.nn.modules.batchnorm import _BatchNorm

        CLRConv, TaskHead = _layers()
        prefixes = []
        for name, m in model.named_modules():
            if isinstance(m, CLRConv):
                prefixes.append(f"{name}.clr.")
            elif isinstance(m, (TaskHead, _BatchNorm)):
                prefixes.append(f"{name}.")
        return [k for k in model.state_dict() if k.startswith(tuple(prefixes))]

    def _bn_state(self, model) -> dict:
        from torch.nn.modules.batchnorm import _BatchNorm

        names = [f"{n}." for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if k.startswith(tuple(names))}

    def _head(self):
        return self.model.get_submodule(self.head_name)

    # --- per task -------------------------------------------------------------------------
    def learn(self, experience) -> None:
        task = int(experience.train.task_label)
        classes = sorted(int(c) for c in experience.train.classes_in_this_experience)
        if not self.pretrained:
            self._pretrain_anchor(experience, classes)
        self._begin_task(task, classes)
        super().learn(experience)
        self.stash[task] = self._task_state()

    def _begin_task(self, task: int, classes: list[int]) -> None:
        """Fresh identity kernels, the anchor's BN state and a new head — or, when a task id
        comes back, its stashed state to continue from."""
        import torch

        CLRConv, _ = _layers()
        head = self._head()
        if task in self.stash:
            head.reshape(self.stash[task][f"{self.head_name}.classes"].tolist())
            self.model.load_state_dict(self.stash[task], strict=False)
            return
        for m in self.model.modules():
            if isinstance(m, CLRConv):
                m.reset()
        with torch.no_grad():
            self.model.load_state_dict(self.anchor_bn, strict=False)
        head.reshape(classes)

    def _task_state(self) -> dict:
        state = self.model.state_dict()
        return {k: state[k].detach().clone() for k in self.task_keys}

    def _pretrain_anchor(self, experience, classes: list[int]) -> None:
        """Train the whole network on the first task's data, then freeze it as the anchor."""
        import logging

        import torch

        from lethe.engine.loop import fit

        log = logging.getLogger("lethe")
        frozen = [p for p in self.model.parameters() if not p.requires_grad]
        CLRConv, _ = _layers()
        clr = [p for m in self.model.modules() if isinstance(m, CLRConv) for p in m.clr.parameters()]
        for p in frozen:
            p.requires_grad_(True)
        for p in clr:                      # identity kernels: the plain network is trained
            p.requires_grad_(False)
        self._head().reshape(classes)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.anchor_pretrain_lr)
        gen = torch.Generator().manual_seed(self.ctx.seed)
        loader = torch.utils.data.DataLoader(experience.train.dataset.train(),
                                             batch_size=self.ctx.train.batch_size, shuffle=True,
                                             generator=gen)
        self.model.train()
        dev, engine = self.ctx.device, self.engine

        def loss_fn(batch):
            x = engine.convert_input(batch[0].to(dev))
            return torch.nn.functional.cross_entropy(self.model(x), batch[1].to(dev))

        def report(epoch, total):
            log.info("clr anchor pre-training epoch %d/%d: mean batch loss %.4f", epoch + 1,
                     self.cfg.anchor_pretrain_epochs, float(total) / max(len(loader), 1))

        fit(engine, self.model, opt, self.cfg.anchor_pretrain_epochs, lambda epoch: loader, loss_fn,
            "CLR anchor pre-training", lr_schedule=self.ctx.train.lr_schedule,
            base_lr=self.cfg.anchor_pretrain_lr, after_epoch=report)
        for p in frozen:
            p.requires_grad_(False)
            p.grad = None
        for p in clr:
            p.requires_grad_(True)
        self.anchor_bn = self._bn_state(self.model)
        self.pretrained = True

    # --- Avalanche callbacks --------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        from collections import defaultdict

        strategy.optimizer.state = defaultdict(dict)   # no Adam moments carried across tasks

    def before_backward(self, strategy, **kwargs):
        if self.cfg.l2:
            strategy.loss = strategy.loss + self.cfg.l2 * self.penalty()

    def penalty(self):
        """The regulariser λ multiplies (``l2_form``, see CLRConfig)."""
        if self.cfg.l2_form == "official":
            # the official code skips tensors whose norm is 0; torch's norm already adds 0
            # with a zero gradient there, so no skip (and no host sync) is needed
            return sum(p.norm() for p in self.model.parameters() if p.requires_grad)
        CLRConv, _ = _layers()
        return sum(m.clr.weight.pow(2).sum() for m in self.model.modules() if isinstance(m, CLRConv))

    # --- inference: each sample through its own task's state --------------------------------
    def predict(self, x, task_ids):
        import torch
        from torch.func import functional_call

        out = torch.zeros(len(x), int(self.ctx.stream.n_classes), device=x.device)
        for t in task_ids.unique().tolist():
            if int(t) not in self.stash:   # a task not learned yet: no head, uniform logits
                continue
            idx = (task_ids == t).nonzero().squeeze(1)
            state = {k: v.to(x.device) for k, v in self.stash[int(t)].items()}
            out[idx] = functional_call(self.model, state, (x[idx],)).to(out.dtype)
        return out

    # --- reporting ------------------------------------------------------------------------
    def log_params(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        states = list(self.stash.values()) or [self._task_state()]
        stored = sum(sum(v.numel() * v.element_size() for v in s.values()) for s in states)
        return {"params/trainable": float(trainable),
                "params/frac_trainable": trainable / self.base_params,
                "params/stored_bytes_per_task": stored / len(states)}

    # --- checkpoints ------------------------------------------------------------------------
    def extra_state(self) -> dict:
        cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {"stash": {int(t): cpu(s) for t, s in self.stash.items()},
                "anchor_bn": cpu(self.anchor_bn), "pretrained": bool(self.pretrained)}

    def load_state_dict(self, state: dict) -> None:
        # the head's shape is the last task's: reshape it before loading the model
        self._head().reshape(state["model"][f"{self.head_name}.classes"].tolist())
        super().load_state_dict(state)

    def load_extra_state(self, state: dict) -> None:
        dev = self.ctx.device
        self.stash = {int(t): {k: v.to(dev) for k, v in s.items()} for t, s in state["stash"].items()}
        self.anchor_bn = {k: v.to(dev) for k, v in state["anchor_bn"].items()}
        self.pretrained = bool(state["pretrained"])
