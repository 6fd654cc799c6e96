"""ConPET (dynamic) — one LoRA expert + head per task, frozen experts of finished tasks and a
PET selector that routes each sample to its top-k experts (Song et al., 2023; repo
Raincleared-Song/ConPET). The family, its replay and what a run should show:
lethe/methods/conpet.py.
"""
from __future__ import annotations

import functools
import warnings

from lethe.errors import ConfigError
from lethe.methods.conpet import ConPETBase, ConPETDynamicConfig, eval_mode
from lethe.registry import register_method


@functools.cache
def _dynamic_model_class():
    import torch
    from torch import nn

    class DynamicConPETModel(nn.Module):
        """Frozen encoder with one LoRA adapter per task ("expert_<t>") and one for the
        selector; a head per expert over its task's classes and a task-id selector head."""

        def __init__(self, base, task_classes: list, n_classes: int, null_logit: float):
            super().__init__()
            hidden = base.head.in_features
            self.base = base
            self.experts = nn.ModuleList(nn.Linear(hidden, len(c)) for c in task_classes)
            self.selector = nn.Linear(hidden, len(task_classes))
            for t, c in enumerate(task_classes):
                self.register_buffer(f"classes_{t}", torch.as_tensor(c, dtype=torch.long))
            self.n_classes, self.null_logit = n_classes, float(null_logit)
            self.n_seen = 0                     # tasks learned so far (inference routes among them)
            self.topk = 1
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.lora_layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
            self.trainable: list = []           # parameters to keep trainable across switches

        def classes(self, t: int):
            return getattr(self, f"classes_{t}")

        def use(self, adapter: str) -> None:
            """Route the encoder through one adapter (peft's switch also resets requires_grad,
            so the trainable set is restored after it)."""
            for layer in self.lora_layers:
                layer.set_adapter(adapter, inference_mode=True)
            for p in self.trainable:
                p.requires_grad_(True)

        def expert_logits(self, t: int, x):
            self.use(f"expert_{t}")
            return self.experts[t](self.base.features(x))

        def mixed_logits(self, x, experts):
            """Each row of ``x`` through its own expert in one encoder pass (peft's per-sample
            ``adapter_names``), then through that expert's head: a list of [n_e, |classes_e|]
            in the order of ``experts.unique()``."""
            names = [f"expert_{e}" for e in experts.tolist()]

            def hook(_mod, args, kwargs):
                return args, {**kwargs, "adapter_names": names}

            handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.lora_layers]
            try:
                feats = self.base.features(x)
            finally:
                for h in handles:
                    h.remove()
            return [self.experts[e](feats[experts == e]) for e in experts.unique().tolist()]

        def selector_logits(self, x, n_seen: int):
            self.use("selector")
            z = self.selector(self.base.features(x))
            mask = torch.arange(z.shape[1], device=z.device) >= n_seen
            return z.masked_fill(mask, float("-inf"))

        def select(self, x, n_seen: int, k: int):
            """[B, k'] experts per sample (k' = min(k, n_seen)); all seen experts when k ≥ n_seen."""
            b = x.shape[0]
            if k >= n_seen:
                return torch.arange(n_seen, device=x.device).expand(b, n_seen)
            return self.selector_logits(x, n_seen).topk(k, dim=1).indices

        def route(self, x, selected, fixed=None, live: int | None = None):
            """Logits [B, n_classes]: each sample's selected experts score their classes, the
            rest get the null logit. ``fixed``: (rows, classes, values) of precomputed expert
            logits, written in one indexed assignment (then no other expert runs but ``live``);
            ``live``: the expert being trained (its own pass, with gradients). Without
            ``fixed`` every other selected expert runs in one shared mixed-adapter pass, so
            the cost does not grow with the number of experts."""
            out = torch.full((x.shape[0], self.n_classes), self.null_logit, device=x.device)
            if fixed is not None:
                rows, cols, vals = fixed
                if len(rows):
                    out[rows, cols] = vals.to(out.dtype)
            else:
                pairs = [(i, int(e)) for i, row in enumerate(selected.tolist()) for e in row if e != live]
                if pairs:
                    rows = torch.tensor([i for i, _ in pairs], device=x.device)
                    experts = torch.tensor([e for _, e in pairs], device=x.device)
                    for e, z in zip(experts.unique().tolist(), self.mixed_logits(x[rows], experts)):
                        r = rows[experts == e]
                        out[r.unsqueeze(1), self.classes(e).unsqueeze(0)] = z.to(out.dtype)
            if live is not None and (selected == live).any():
                r = (selected == live).any(1).nonzero().flatten()
                out[r.unsqueeze(1), self.classes(live).unsqueeze(0)] = self.expert_logits(live, x[r]).to(out.dtype)
            return out

        def forward(self, x):
            if self.n_seen == 0:
                return torch.full((x.shape[0], self.n_classes), self.null_logit, device=x.device)
            return self.route(x, self.select(x, self.n_seen, self.topk))

    return DynamicConPETModel


@register_method("conpet_dynamic", config=ConPETDynamicConfig, kinds=("learn",),
                 settings=("class_incremental",))
class ConPETDynamic(ConPETBase):
    """ConPET (dynamic): per-task LoRA experts, frozen old experts, a PET selector picks top-k."""

    name = "conpet_dynamic"
    not_distributable = ("its training forward runs the selected experts, not the model as a "
                         "whole, so DDP cannot average the gradients")

    def setup(self, model):
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        from lethe.models.lora import lora_targets

        if self.cfg.topk < 1:
            raise ConfigError("method.topk must be ≥ 1")
        model.requires_grad_(False)
        targets = lora_targets(model.encoder, None, list(self.cfg.target_modules))
        import re

        config = LoraConfig(r=int(self.cfg.lora_rank), lora_alpha=float(self.cfg.lora_alpha),
                            lora_dropout=float(self.cfg.lora_dropout), bias="none",
                            target_modules="(" + "|".join(re.escape(t) for t in targets) + ")")
        with warnings.catch_warnings():   # peft warns that several adapters share the model
            warnings.simplefilter("ignore")
            for name in [f"expert_{t}" for t in range(len(self.task_classes))] + ["selector"]:
                inject_adapter_in_model(config, model.encoder, adapter_name=name)
        net = _dynamic_model_class()(model, self.task_classes, self.ctx.stream.n_classes,
                                     self.cfg.null_logit)
        net.topk = int(self.cfg.topk)
        net.requires_grad_(False)
        for p in net.experts[0].parameters():   # the template's optimizer needs a non-empty
            p.requires_grad_(True)              # list at build time (Avalanche then adds all)
        self.cache: dict = {}            # (expert, sample id) → logits of a frozen expert: valid
                                         # for good, kept across stages (checkpointed)
        self.sel_cache: dict = {}        # sample id → selected experts (this stage's selector)
        self.selector_train_acc: float | None = None
        self.class_tensors = [torch.as_tensor(c, dtype=torch.long) for c in self.task_classes]
        return net

    # --- parameters of one expert / the selector ----------------------------------------
    def adapter_params(self, adapter: str) -> list:
        tag = f".{adapter}."
        return [p for n, p in self.model.base.named_parameters() if ".lora_" in n and tag in n + "."]

    def expert_params(self, t: int) -> list:
        return self.adapter_params(f"expert_{t}") + list(self.model.experts[t].parameters())

    def selector_params(self) -> list:
        return self.adapter_params("selector") + list(self.model.selector.parameters())

    def _train_only(self, params: list) -> None:
        self.model.requires_grad_(False)
        self.model.trainable = list(params)
        for p in params:
            p.requires_grad_(True)

    # --- the stage ----------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy)
        self.sel_cache = {}
        t = self.position
        if t >= 1:
            self.train_selector(t)
        self._train_only(self.expert_params(t))

    def train_selector(self, t: int) -> None:
        """Task-id classification over tasks 0..t on the replay loader, before the expert."""
        import types

        import torch

        from lethe.engine.loop import fit, make_optimizer

        net, train = self.model, self.ctx.train
        self._train_only(self.selector_params())
        lr = self.cfg.selector_lr or train.lr
        hp = types.SimpleNamespace(optimizer=train.optimizer, lr=lr, momentum=train.momentum,
                                   weight_decay=train.weight_decay)
        opt = make_optimizer(self.selector_params(), hp)
        loader = self.stage_loader(seed_tag=1)
        dev = self.ctx.device
        counts = torch.zeros(2, dtype=torch.long, device=dev)   # hits, seen: no sync per step
        net.train()

        def loss_fn(batch):
            x, y = batch[0], batch[1]
            task = self.class_task[y].to(dev)
            z = net.selector_logits(self.engine.convert_input(x.to(dev)), t + 1)
            counts[0] += (z.argmax(1) == task).sum()
            counts[1] += len(task)
            return torch.nn.functional.cross_entropy(z, task)

        def epoch_done(epoch, total):
            self.selector_train_acc = int(counts[0]) / max(int(counts[1]), 1)
            counts.zero_()

        fit(self.engine, net, opt, self.cfg.selector_epochs or train.epochs, lambda epoch: loader,
            loss_fn, "ConPET selector", lr_schedule=train.lr_schedule, base_lr=lr,
            after_epoch=epoch_done)
        opt.zero_grad(set_to_none=True)

    def _selected(self, x, ids, t: int):
        """Experts per sample for training: top-k (cached per sample), teacher-forced."""
        import torch

        net, k = self.model, int(self.cfg.topk)
        if k >= t + 1:
            return net.select(x, t + 1, k)
        missing = [i for i, s in enumerate(ids.tolist()) if s not in self.sel_cache]
        if missing:
            rows = torch.tensor(missing, device=x.device)
            with torch.no_grad(), eval_mode(net):
                picks = net.select(x[rows], t + 1, k).cpu()
            for i, p in zip(missing, picks):
                self.sel_cache[int(ids[i])] = p
        return torch.stack([self.sel_cache[int(s)] for s in ids.tolist()]).to(x.device)

    def train_forward(self, strategy):
        """Training logits: cached old experts + the current expert, null logit elsewhere."""
        import torch

        net, t = self.model, self.position
        x, y, ids = strategy.mb_x, strategy.mb_y, strategy.mbatch[2]
        if self.cfg.teacher_forcing and self.cfg.topk == 1 and t >= 1:
            # top-1 with teacher forcing always ends at the true expert: the selector's pick
            # would be overwritten, so it is not computed (same logits, less work)
            selected = self.class_task.to(x.device)[y].unsqueeze(1)
        else:
            selected = self._selected(x, ids, t)
        if self.cfg.teacher_forcing:
            true = self.class_task.to(x.device)[y]
            hit = (selected == true.unsqueeze(1)).any(1)
            selected = selected.clone()
            selected[~hit, -1] = true[~hit]
        # old experts: logits of uncached samples in one mixed pass, then all from the cache,
        # assembled into (row, class, value) triples: no per-expert work in the step
        id_list = ids.tolist()
        pairs = [(i, e) for i, row in enumerate(selected.tolist()) for e in row if e != t]
        keys = [(e, int(id_list[i])) for i, e in pairs]
        todo = {}
        for key, (i, _) in zip(keys, pairs):
            if key not in self.cache:
                todo.setdefault(key, i)
        if todo:
            rows = torch.tensor(list(todo.values()), device=x.device)
            experts = torch.tensor([key[0] for key in todo], device=x.device)
            with torch.no_grad(), eval_mode(net):
                parts = net.mixed_logits(x[rows], experts)
            for e, z in zip(experts.unique().tolist(), parts):
                for key, row in zip([k for k in todo if k[0] == e], z.cpu()):
                    self.cache[key] = row
        fixed = None
        if pairs:
            sizes = [len(self.task_classes[e]) for _, e in pairs]
            fixed = (torch.tensor([i for (i, _), n in zip(pairs, sizes) for _ in range(n)], device=x.device),
                     torch.cat([self.class_tensors[e] for _, e in pairs]).to(x.device),
                     torch.cat([self.cache[k] for k in keys]).to(x.device))
        out = net.route(x, selected, fixed, live=t)   # the current expert: its own pass, with grads
        if not out.requires_grad:            # no sample routed to the current expert
            out = out + 0.0 * sum(p.sum() for p in self.expert_params(t))
        return out

    def strategy_class(self):
        from avalanche.training.templates import SupervisedTemplate

        method = self

        class ConPETTemplate(SupervisedTemplate):
            def forward(self):
                if self.is_training:
                    return method.train_forward(self)
                return super().forward()

        return ConPETTemplate

    def learn(self, experience) -> None:
        super().learn(experience)
        self.model.requires_grad_(False)   # the finished expert is frozen for good
        self.model.trainable = []
        self.model.n_seen = len(self.learned)
        self.sel_cache = {}
        self._cache_memory_logits(self.position)

    def _cache_memory_logits(self, t: int) -> None:
        """The finished expert's logits on its task's memory, once: replayed samples of task t
        never need expert t's forward again (it is frozen), whatever the number of tasks."""
        import torch

        rows = self.memory[t]
        with torch.no_grad(), eval_mode(self.model):
            for s in range(0, len(rows), 256):
                r = rows[s:s + 256]
                z = self.model.expert_logits(t, self.pool.x[r].to(self.ctx.device)).cpu()
                for i, row in zip(self.pool.ids[r].tolist(), z):
                    self.cache[(t, int(i))] = row

    # --- inference and logging ----------------------------------------------------------
    def predict(self, x, task_ids):
        return self.model(x)

    def selector_accuracy(self) -> float | None:
        """Task-routing accuracy of the selector on the test data of the seen tasks."""
        import torch

        n = self.model.n_seen
        if n < 2:
            return None
        test = self.ctx.stream.test
        rows = (test.exp < n).nonzero().flatten()
        hits = 0
        with torch.no_grad(), eval_mode(self.model):
            for s in range(0, len(rows), 256):
                r = rows[s:s + 256]
                z = self.model.selector_logits(test.x[r].to(self.ctx.device), n)
                hits += int((z.argmax(1).cpu() == test.exp[r]).sum())
        return hits / max(len(rows), 1)

    def log_params(self) -> dict:
        out = {"params/trainable": float(sum(p.numel() for p in self.expert_params(max(self.position, 0)))),
               "params/stored_bytes_per_task": float(sum(p.numel() * p.element_size()
                                                         for p in self.expert_params(0)))}
        acc = self.selector_accuracy()
        if acc is not None:
            out["conpet/selector_acc"] = acc
        if self.selector_train_acc is not None:
            out["conpet/selector_train_acc"] = self.selector_train_acc
        return out

    def extra_state(self) -> dict:
        import torch

        keys = sorted(self.cache)
        by_expert = {}
        for e in sorted({k[0] for k in keys}):
            ks = [k for k in keys if k[0] == e]
            by_expert[int(e)] = {"ids": torch.tensor([k[1] for k in ks], dtype=torch.long),
                                 "logits": torch.stack([self.cache[k] for k in ks])}
        return super().extra_state() | {"logit_cache": by_expert}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.model.n_seen = len(self.learned)
        self.cache = {(int(e), int(i)): row for e, d in state.get("logit_cache", {}).items()
                      for i, row in zip(d["ids"].tolist(), d["logits"])}
