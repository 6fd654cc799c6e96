"""Data-parallel training over several processes: ``lethe run CONFIG --nproc N``.

The CLI re-launches itself through ``torch.distributed.run`` (torchrun: standalone rendezvous,
N local processes, no restarts); every process runs the same run. In each, the training engine
builds Lightning Fabric with its ``ddp`` strategy (backend ``distributed.backend``: ``auto`` =
nccl on CUDA, gloo on CPU; Fabric opens the process group) and wraps the model in torch's
``DistributedDataParallel`` through that strategy.

What stays the same as one process, and why:

- **The global batch.** The template's loader (or the fast path's, or a plugin's, e.g.
  replay's) yields the single-process mini-batch on every rank, in the same order: the order is
  drawn from torch's global RNG, which every rank seeds with the run seed and keeps in step.
  Each rank keeps the rows ``rank::N`` of it (a DistributedSampler over each batch), so the
  per-rank batch is ``train.batch_size / N``. DDP averages the ranks' gradients; each rank's
  loss is scaled by ``N · n_rank / n_batch`` so that this average is the gradient of the mean
  loss over the whole batch, also for a last batch that does not split evenly (a term the
  same on every rank, such as EWC's penalty, keeps its weight: the scales average to 1).
- **The model as methods see it.** Methods, plugins, checkpoints and the evaluator keep the
  plain module (its parameter names, ``strategy.model is self.model``); only the template's
  training forward is routed through the DDP wrapper (:meth:`DataParallel.forward`), which
  DDP needs to all-reduce the backward that follows. A forward that bypasses it would train
  each rank on its own shard unseen, so the engine refuses the step instead.
- **Randomness.** Draws inside the training forward (dropout) come from a per-rank generator
  seeded from the run seed, the rank and the iteration (:func:`rank_seed`), so ranks draw
  different masks and the shared RNG stays in step for the next shuffle.

One run whatever the process count: rank 0 alone opens the tracker and writes checkpoints and
artifacts (the others get :class:`NullTracker`); the evaluators shard the test rows over the
ranks and gather the predictions (lethe.metrics.evaluator.gather_rows). The same ranks come
from torchrun (``--nproc``) or from a SLURM job's tasks (lethe.platform.sweep.jobs.join_ranks).
``distributed.strategy=fsdp`` shards a Hugging Face causal LM's weights in place instead
(:func:`fully_shard_model`, torch's FSDP2): no wrapper, every rank evaluates all rows;
checkpoints and best-model copies gather the whole state collectively and rank 0 writes it in
the single-process format (:func:`full_model_state`), loaded back by sharding it (see
docs/distributed.md).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lethe.errors import ConfigError, RunError

STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("auto", "nccl", "gloo")
RUN_DIR_ENV = "LETHE_DIST_DIR"   # set by the launcher: where rank 0 writes the run id
TAGS_ENV = "LETHE_DIST_TAGS"     # set by the launcher: extra MLflow tags of the run (JSON)
_settings: dict | None = None   # this process's distributed: section, set by the runner


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


def is_lead() -> bool:
    """Rank 0 (or a single process): the one that talks to MLflow and writes files."""
    return rank() == 0


def check_config(dist) -> None:
    """ConfigError for a bad ``distributed:`` setting (called by the config loader)."""
    from lethe.registry import check_choice

    check_choice("distributed.strategy", dist.strategy, STRATEGIES)
    check_choice("distributed.backend", dist.backend, BACKENDS)


def check_launch(cfg, nproc: int) -> None:
    """What ``--nproc N`` needs of a config, checked before any process starts."""
    if nproc < 1:
        raise ConfigError(f"bad value for --nproc: {nproc} (must be ≥ 1)")
    if cfg.distributed.strategy == "fsdp" and nproc > 1:
        _check_fsdp(cfg)
    if cfg.train.batch_size % nproc:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split over --nproc {nproc}: "
                          f"the global batch is divided evenly between the processes; pick a batch "
                          f"size divisible by {nproc}")
    if str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device={cfg.device} with --nproc: each process takes its own GPU "
                          f"(LOCAL_RANK); use device=cuda or auto")


def _check_fsdp(cfg) -> None:
    """What this release's FSDP supports, said before any process starts."""
    if cfg.model.name != "hf_causal_lm":
        raise ConfigError(f"distributed.strategy=fsdp shards Hugging Face causal LMs "
                          f"(model.name=hf_causal_lm), not model.name={cfg.model.name}; use "
                          f"distributed.strategy=ddp")


def configure(dist, seed: int) -> None:
    """Record this process's ``distributed:`` settings and run seed when it is one rank of
    several (the engines built in it then train data-parallel)."""
    global _settings
    _settings = {"strategy": str(dist.strategy), "backend": str(dist.backend), "seed": int(seed)} \
        if world_size() > 1 else None


def active() -> dict | None:
    return _settings if world_size() > 1 else None


def backend_for(backend: str, device) -> str:
    return ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend


def rank_device(device):
    """This rank's device: its own GPU (``cuda:LOCAL_RANK``) when the run is on CUDA."""
    import torch

    if world_size() > 1 and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def rank_seed(seed: int, rank_: int, step: int = 0) -> int:
    """A seed for draws that must differ between ranks, derived from the run seed."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rank_), int(step)]).generate_state(1)[0])


def announce_run(run_id: str) -> None:
    """Rank 0 tells the launcher its MLflow run id (the launcher ends the run when a rank dies)."""
    folder = os.environ.get(RUN_DIR_ENV)
    if folder and is_lead() and run_id:
        Path(folder, "run_id").write_text(run_id)


def announce_result(result) -> None:
    """Rank 0 hands the launcher its run's result (``--seeds`` aggregates the seeds' finals)."""
    folder = os.environ.get(RUN_DIR_ENV)
    if folder and is_lead() and result.run_id:
        import json

        Path(folder, "result.json").write_text(json.dumps(
            {"run_id": result.run_id, "tracking_uri": result.tracking_uri,
             "experiment": result.experiment, "final": result.final}))


def read_result(folder: str) -> dict | None:
    import json

    path = Path(folder, "result.json")
    return json.loads(path.read_text()) if path.exists() else None


def launcher_tags() -> dict | None:
    """The extra MLflow tags the launcher gave this rank's run (None outside ``--nproc``)."""
    import json

    raw = os.environ.get(TAGS_ENV) if os.environ.get(RUN_DIR_ENV) else None
    return json.loads(raw) if raw else None


class DataParallel:
    """One engine's DDP: the wrapper, the batch shard, the routed forward."""

    def __init__(self, fabric, seed: int, fsdp: bool = False):
        _avalanche_as_one_process()
        self.fabric = fabric
        self.fsdp = fsdp          # the model is sharded in place (fully_shard): no wrapper
        self.rank, self.world = rank(), world_size()
        self.seed = seed
        self.weight = 1.0         # this rank's loss scale for the current mini-batch
        self._ddp = None
        self._wrapped: tuple = ()  # the trainable parameters the wrapper was built for
        self._routed = False      # the current step's forward went through the wrapper

    def wrapper(self, model):
        """The DDP wrapper of ``model``, built again only when its trainable parameters
        changed (a method that adds a head or an adapter between experiences)."""
        params = tuple(id(p) for p in model.parameters() if p.requires_grad)
        if self._ddp is None or self._ddp.module is not model or params != self._wrapped:
            self._ddp = self.fabric.strategy.setup_module(model)
            self._wrapped = params
        return self._ddp

    def shard(self, mbatch):
        """This rank's rows (``rank::world``) of every batch-sized tensor of ``mbatch``; sets
        :attr:`weight`. A batch with fewer rows than ranks leaves some ranks none: they run one
        row with weight 0 (DDP needs every rank's backward)."""
        import torch

        n = _batch_rows(mbatch)
        rows = torch.arange(self.rank, n, self.world)
        target = mbatch[1] if len(mbatch) > 1 else None
        if n and len(rows) and _is_token_target(target, n):
            # a token-mean loss (causal LM): the ranks' shares of the batch's loss terms
            mine = loss_terms(target[rows.to(target.device)])
            self.weight = self.world * mine / loss_terms(target).clamp(min=1)
        else:
            self.weight = self.world * len(rows) / n if n else 0.0
        if len(rows) == 0:
            rows = torch.arange(min(n, 1))
        return [_take(item, rows, n) for item in mbatch]

    @contextlib.contextmanager
    def forward(self, model, sync: bool, step: int):
        """Route ``model``'s forward through DDP while the template computes its forward (its
        ``self.model`` stays the plain module, as in Fabric's ``mark_forward_method``); gradient
        sync only on the last mini-batch of an accumulation window; dropout per rank."""
        import torch

        if self.fsdp:
            with self._fsdp_forward(model, sync, step):
                yield
            return
        ddp = self.wrapper(model)
        self._routed = False

        def routed(*args, **kwargs):
            del model.forward              # DDP calls the module: its own forward this time
            try:
                self._routed = True
                return ddp(*args, **kwargs)
            finally:
                model.forward = routed

        model.forward = routed
        device = next(model.parameters()).device
        try:
            with contextlib.ExitStack() as stack:
                if not sync:
                    stack.enter_context(ddp.no_sync())
                stack.enter_context(torch.random.fork_rng(
                    devices=[device.index or 0] if device.type == "cuda" else [],
                    device_type=device.type if device.type == "cuda" else "cuda"))
                torch.manual_seed(rank_seed(self.seed, self.rank, step))
                yield
        finally:
            vars(model).pop("forward", None)
        if not self._routed:
            raise RunError(f"this method's training forward does not call its model "
                           f"({type(model).__name__}) but parts of it, so DDP cannot average the "
                           f"gradients between processes; run it without --nproc")


    @contextlib.contextmanager
    def _fsdp_forward(self, model, sync: bool, step: int):
        """FSDP's hooks sit on the sharded modules themselves: nothing to route; gradients are
        reduce-scattered only at the end of an accumulation window; dropout per rank."""
        import torch

        device = next(model.parameters()).device
        model.set_requires_gradient_sync(sync)
        try:
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [],
                                       device_type=device.type if device.type == "cuda" else "cuda"):
                torch.manual_seed(rank_seed(self.seed, self.rank, step))
                yield
        finally:
            model.set_requires_gradient_sync(True)


def fully_shard_model(model) -> None:
    """FSDP2 (torch's ``fully_shard``) on every decoder layer of a Hugging Face model (the
    classes its ``_no_split_modules`` names) and then on the whole model, in place: each rank
    keeps 1/N of every weight, its gradient and optimizer state; a layer's weights are
    all-gathered for its forward and backward only. The optimizer must be built afterwards
    (it is: methods build theirs after ``Engine.prepare_model``)."""
    from torch.distributed.fsdp import fully_shard

    layers = set()
    for module in model.modules():
        layers.update(getattr(module, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in layers]
    for module in units:
        fully_shard(module)
    # then every Hugging Face model in it, innermost first: code that calls the HF model
    # rather than lethe's wrapper (the QA evaluator's ``lm.generate``) gathers its own weights
    for module in reversed([m for m in model.modules() if getattr(m, "_no_split_modules", None)]):
        if module is not model:
            fully_shard(module, reshard_after_forward=True)
    # the root too reshards after every forward (torch keeps it gathered by default, for the
    # backward that follows): lethe evaluates between training stages without a backward, and
    # a root left gathered would hand its full tensors, not the shards, to the next optimizer
    fully_shard(model, reshard_after_forward=True)
    params = list(model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    if _settings is not None:   # said in run.log once the run has one (Runner)
        _settings["sharded"] = (f"FSDP: {len(units)} layers sharded over {world_size()} ranks; "
                                f"this rank holds {100.0 * local / max(1, total):.1f}% of the "
                                f"{total} weights")


def is_sharded(model) -> bool:
    """Whether ``model`` is sharded in place by FSDP2 (:func:`fully_shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full(cpu_offload: bool, broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, broadcast_from_rank0=broadcast)


def full_model_state(model, everywhere: bool = False) -> dict:
    """The whole state_dict of a sharded ``model`` (the unsharded model's names), gathered
    collectively (every rank calls it): rank 0 alone gets it, on the CPU (to write; the others
    get ``{}``), or with ``everywhere`` every rank on its device (to build a copy)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=not everywhere))


def load_full_model_state(model, state: dict, from_rank0: bool = False) -> None:
    """Shard a whole state_dict into the sharded ``model`` (a collective): every rank holds
    ``state`` (a checkpoint each read), or with ``from_rank0`` rank 0 alone sends it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full(cpu_offload=False, broadcast=from_rank0))


def _param_names(model, optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in ``model``, in torch's state_dict numbering
    (consecutive over the parameter groups)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    try:
        return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise RunError("the optimizer holds parameters that are not the sharded model's; "
                       "checkpoints under distributed.strategy=fsdp need them to be") from None


def full_optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state of a sharded ``model`` (a collective; rank 0 gets it, on the
    CPU), in torch's own ``optimizer.state_dict()`` format (parameters numbered, not named),
    so a checkpoint reads the same whatever the process count."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True))
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    if not named.get("param_groups"):   # ranks other than 0
        return {}
    return {"state": {index[n]: v for n, v in named.get("state", {}).items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in named["param_groups"]]}


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Shard a whole optimizer state (torch's format, as :func:`full_optimizer_state` gives
    it, held by every rank) into ``optimizer`` of the sharded ``model`` (a collective)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    named = {"state": {names[int(i)]: v for i, v in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                              for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=_full(cpu_offload=False))


def rebind_optimizer(optimizer, old: dict, model) -> None:
    """Point ``optimizer`` at ``model``'s parameters named as its current ones are in ``old``
    (name -> parameter), moving their state along: a sharded model rebuilt with the same
    shapes (adapters added, then merged) shards every parameter as before, so each state
    tensor is already the new parameter's shard."""
    new, name_of = dict(model.named_parameters()), {id(p): n for n, p in old.items()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            name = name_of.get(id(p))
            if name not in new:
                raise RunError(f"the rebuilt model has no parameter '{name}' for the optimizer")
            group["params"][i] = new[name]
            if p in optimizer.state:
                optimizer.state[new[name]] = optimizer.state.pop(p)


def describe() -> str:
    """One line on this process's part in the run, for its log."""
    if active() is None:
        return "one process"
    return (f"rank {rank()} of {world_size()}, {_settings['strategy']}"
            + (f"; {_settings['sharded']}" if "sharded" in _settings else ""))


def _avalanche_as_one_process() -> None:
    """Avalanche's own distributed mode switches on when a process group exists: its loaders
    (the template's, replay's) then shard the data with a DistributedSampler (per-rank batch =
    train_mb_size, another order), and loggers refuse to exist outside rank 0. lethe shards
    the template's batches itself (above), so Avalanche runs on every rank as in one process;
    its helper (a process-wide singleton with no setting for this) is told so here."""
    from avalanche.distributed.distributed_helper import _DistributedHelperCls as Helper

    Helper.is_distributed = property(lambda self: False)
    Helper.rank = property(lambda self: 0)
    Helper.world_size = property(lambda self: 1)


def _is_token_target(target, n: int) -> bool:
    import torch

    return (isinstance(target, torch.Tensor) and target.dim() == 2 and len(target) == n
            and not target.is_floating_point())


def loss_terms(target):
    """How many terms a batch's mean loss averages: its target tokens (a 2-D integer target,
    -100 = ignored, as a causal LM's cross-entropy; a device tensor, no host sync) or its rows."""
    if _is_token_target(target, len(target)):
        return (target != -100).sum()
    return len(target)


def _batch_rows(mbatch) -> int:
    import torch

    return next((len(t) for t in mbatch if isinstance(t, torch.Tensor) and t.dim()), 0)


def _take(item, rows, n: int):
    import torch

    if isinstance(item, torch.Tensor) and item.dim() and len(item) == n:
        return item[rows.to(item.device)]
    return item


class NullTracker:
    """The tracker of ranks other than 0: accepts every call, records nothing."""

    run_id = None
    unreachable = None
    remote = False

    def __init__(self, uri: str | None, experiment: str):
        self.uri, self.experiment = uri, experiment

    def ready(self):
        return self

    def metric_history(self, key: str) -> list:
        return []

    def metric_keys(self) -> list:
        return []

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments for N local copies of ``lethe`` with ``argv``."""
    return ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", "--max-restarts=0",
            "--module", "lethe.platform.cli", *argv]


def launch(nproc: int, argv: list[str], folder: str, tags: dict | None = None) -> tuple[int, int | None]:
    """Run ``lethe argv`` in ``nproc`` processes; returns (exit code, the first failing rank or
    None). torchrun stops the other ranks as soon as one fails. ``tags``: extra MLflow tags of
    the run rank 0 starts."""
    import json
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    for name in ("torch.distributed.elastic", "torch.distributed.run"):   # its own chatter
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[RUN_DIR_ENV] = folder
    os.environ[TAGS_ENV] = json.dumps(tags or {})
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # torchrun's default, without its banner
    try:
        torchrun(get_args_parser().parse_args(torchrun_args(nproc, argv)))
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode
        return (code if code > 0 else 1), failed_rank
    except SignalException:   # SIGTERM on the launcher: torchrun has stopped the ranks
        raise KeyboardInterrupt from None
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        os.environ.pop(TAGS_ENV, None)
    return 0, None


__all__ = ["DataParallel", "NullTracker", "STRATEGIES", "BACKENDS", "check_config", "check_launch",
           "configure", "active", "world_size", "rank", "local_rank", "is_lead", "rank_seed",
           "rank_device", "backend_for", "announce_run", "announce_result", "read_result",
           "launcher_tags", "launch", "torchrun_args", "loss_terms", "is_sharded",
           "full_model_state", "load_full_model_state", "full_optimizer_state",
           "load_full_optimizer_state", "rebind_optimizer"]
