"""Experiment configuration: OmegaConf structured configs validated per component.

A YAML file (or preset name) plus dotlist overrides becomes an :class:`ExperimentConfig`.
The ``scenario``, ``model`` and ``method`` nodes are validated against the dataclass that
the chosen ``name`` registered, so a wrong key, type or value fails before any work starts,
naming the key path and the closest valid key. Nothing in a YAML file can import code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from lethe import registry
from lethe.engine.distributed import check_config as check_distributed
from lethe.engine.engine import check_config as check_engine
from lethe.engine.schedules import LRScheduleConfig
from lethe.engine.schedules import check_config as check_lr_schedule
from lethe.errors import ConfigError
from lethe.schema import COMPONENTS, node_error, validate_component

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class TrainConfig:
    epochs: int = 1               # passes over each learn experience
    batch_size: int = 32
    optimizer: str = "sgd"        # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9         # sgd only
    weight_decay: float = 0.0
    num_workers: int = 0
    log_every_iter: bool = False  # train/loss per iteration instead of per epoch
    # the training engine (lethe/engine/engine.py), the same for every method:
    precision: str = "fp32"       # fp32 | bf16-mixed | fp16-mixed (fp32 master weights) | bf16
    grad_accum_steps: int = 1     # optimizer step every k mini-batches (mean of their losses)
    grad_clip_norm: float = 0.0   # > 0: clip the total gradient norm before each step
    gradient_checkpointing: bool = False  # Hugging Face and timm models: recompute activations
    optimizer_reset: str = "never"  # never | experience: clear optimizer state at each experience
    # lr per step (rewarm_cosine | infinite | warmup_linear | cosine | step; see
    # lethe/engine/schedules.py); none = constant lr
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)


@dataclass
class EvalConfig:
    batch_size: int = 0           # 0 = auto-size from available memory
    initial: bool = True          # evaluate the untrained model too (needed for FWT)
    amp: bool = False             # autocast on CUDA
    save_predictions: bool = True  # log predictions.pt
    every_epochs: int = 0         # >0: validate every N epochs within an experience
    every_steps: int = 0          # >0: validate every N training iterations
    val_fraction: float = 0.1     # validation split carved from each experience's training data


@dataclass
class TrackingConfig:
    uri: Optional[str] = None     # None = $MLFLOW_TRACKING_URI or MLflow's default (./mlflow.db)
    experiment: str = "lethe"
    run_name: Optional[str] = None


@dataclass
class CheckpointConfig:
    enabled: bool = True
    dir: str = "lethe_runs"       # <dir>/<mlflow run id>/state.pt after each experience
    select: str = "last"          # model kept for each experience: last | best (needs eval.every_*)
    select_metric: str = "val/acc"  # val/acc (higher is better) | val/loss (lower is better)


@dataclass
class DistributedConfig:
    """``lethe run CONFIG --nproc N`` (docs/distributed.md); no effect in a single process."""
    strategy: str = "ddp"         # ddp | fsdp (hf_causal_lm: torch's fully_shard per decoder layer)
    backend: str = "auto"         # auto (nccl on CUDA, gloo on CPU) | nccl | gloo


@dataclass
class PaperConfig:
    """The number a paper reports for this config (docs/paper-presets.md); `lethe compare` shows
    it beside the measured mean ± std. Documentation only: it changes nothing in the run."""
    citation: str = MISSING       # authors, venue, year
    table: str = MISSING          # where the number is printed, e.g. "Table 1, forget10"
    metric: str = MISSING         # the lethe metric key it corresponds to (`lethe list metrics`)
    value: float | None = MISSING  # on lethe's scale for that key (accuracies in [0, 1], not
                                  # %); null only with a note starting "unverified"
    note: str = ""                # how the paper's setting differs; "unverified: ..." when the
                                  # number could not be checked against the paper


@dataclass
class RequiredPath:
    """A local folder or file a preset needs (`requires:`), checked when the config loads."""
    key: str = MISSING            # the config key holding the path, e.g. scenario.path
    what: str = MISSING           # what to put there, e.g. "the TOFU json files"
    source: str = ""              # where to download it from


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    deterministic: bool = False   # torch.use_deterministic_algorithms
    scenario: Any = MISSING       # validated against the registered scenario schema
    model: Any = MISSING
    method: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    paper: PaperConfig | None = None   # the paper's reported number (paper presets)
    requires: list[RequiredPath] = field(default_factory=list)  # local data / model folders


CHOICES = {
    "device": None,
    "train.optimizer": ("sgd", "adam", "adamw"),
}


def resolve_path(config: str) -> Path:
    """A config argument is a YAML path or the name of a shipped preset."""
    path = Path(config)
    if path.is_file():
        return path
    preset = PRESET_DIR / (config if config.endswith((".yaml", ".yml")) else f"{config}.yaml")
    if preset.is_file() and preset.resolve().is_relative_to(PRESET_DIR):  # paper/x, not ../x
        return preset
    names = presets()
    name = path.stem if path.is_absolute() else config.removesuffix(".yaml").removesuffix(".yml")
    raise ConfigError(f"config file not found: '{config}'{registry.suggest(name, names)} "
                      f"(give a YAML path or a preset: {', '.join(names)})")


def presets() -> list[str]:
    """Shipped presets by name: conf/x.yaml is `x`, conf/paper/x.yaml is `paper/x`."""
    return sorted(p.relative_to(PRESET_DIR).with_suffix("").as_posix()
                  for p in PRESET_DIR.rglob("*.yaml"))


def _node_limit(path: Path) -> int:
    """OmegaConf's cap on YAML nodes after alias expansion, scaled to the file: a document
    without aliases has fewer nodes than bytes, so a plain long list (12,000 ids of a forget
    request) parses, while a few lines of nested aliases ("billion laughs") still exceed
    both this cap and OmegaConf's own alias-expansion ratio check, which stays on."""
    return max(10_000, path.stat().st_size)


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path, max_yaml_expanded_nodes=_node_limit(path))
    except Exception as exc:  # yaml.YAMLError carries line/column in its message
        text = " ".join(str(exc).split())
        if "YAML node expansion" in text or "YAML aliases expand" in text:  # OmegaConf's guard
            text = (f"its aliases (&name / *name) expand to more than {_node_limit(path)} nodes; "
                    f"write the values out instead of nesting aliases")
        raise ConfigError(f"cannot parse {path}: {text}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    refuse_outside_resolvers(cfg, str(path))
    return cfg


# Resolvers that only read the config itself. The other built-ins read outside it: oc.env the
# environment (a YAML file from someone else could copy secrets into a shared store), oc.coerce
# imports a module named in the value, oc.decode and oc.create turn a plain string into new
# interpolations, which would hide an oc.env from this check.
CONFIG_ONLY_RESOLVERS = ("oc.select", "oc.dict.keys", "oc.dict.values", "oc.deprecated")
ALLOW_ENV = "LETHE_ALLOW_ENV_INTERPOLATION"


def _resolver_names(text: str) -> list[str]:
    """Resolver names in one string value, by OmegaConf's own grammar (a name built from an
    interpolation, `${${x}:...}`, is returned as written: it is refused as unknown)."""
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as P
    from omegaconf.grammar_parser import parse

    try:
        tree = parse(text)
    except Exception:  # not valid interpolation syntax: OmegaConf reports it on resolution
        return []
    names, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, P.ResolverNameContext):
            names.append(node.getText())
        todo.extend(node.getChildren() if hasattr(node, "getChildren") else [])
    return names


def refuse_outside_resolvers(cfg: DictConfig, where: str) -> None:
    """A ConfigError for any interpolation that reads outside the config (see above);
    ``${oc.env:...}`` is allowed when the user sets LETHE_ALLOW_ENV_INTERPOLATION=1."""
    import os

    allowed = CONFIG_ONLY_RESOLVERS + (("oc.env",) if os.environ.get(ALLOW_ENV) == "1" else ())
    values = OmegaConf.to_container(cfg, resolve=False)
    todo = [("", values)]
    while todo:
        key, node = todo.pop()
        if isinstance(node, dict):
            todo += [(f"{key}.{k}" if key else str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            todo += [(f"{key}[{i}]", v) for i, v in enumerate(node)]
        elif isinstance(node, str) and "${" in node:
            for name in _resolver_names(node):
                if name not in allowed:
                    hint = (f"; to read an environment variable on purpose, set {ALLOW_ENV}=1"
                            if name == "oc.env" else "")
                    raise ConfigError(
                        f"{where}: '{key}: {node}' uses the resolver '{name}', which is refused: "
                        f"it can read outside the config (allowed: plain ${{key}} references and "
                        f"{', '.join(allowed)}){hint}")


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. method.lr=0.01)")
    try:
        over = OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from None
    refuse_outside_resolvers(over, "override")
    return over


def load_config(config: str, overrides: list[str] | None = None) -> DictConfig:
    """Load, merge and validate an experiment config. Raises ConfigError with one message."""
    path = resolve_path(config)
    raw = _load_yaml(path)
    raw.pop("sweep", None)   # a sweep: block is read by `lethe sweep`; one run ignores it
    over = _parse_overrides(list(overrides or []))
    for node_name in COMPONENTS:  # switching `name` on the command line starts a fresh node
        new_name = OmegaConf.select(over, f"{node_name}.name")
        old_name = OmegaConf.select(raw, f"{node_name}.name")
        if new_name is not None and new_name != old_name and node_name in raw:
            raw[node_name] = {"name": new_name}
    try:
        raw = OmegaConf.merge(raw, over)
    except oc_errors.OmegaConfBaseException as exc:
        raise ConfigError(f"cannot apply overrides: {exc}") from None
    return validate(raw)


def validate(raw: DictConfig | dict) -> DictConfig:
    raw = OmegaConf.create(OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else raw)
    _check_resolvable(raw)
    _check_requires(raw)   # before the components: a missing download is the first thing to say
    components = {}
    for node_name in COMPONENTS:
        node = raw.get(node_name)   # validated on its own: its ${...} references resolved first
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        components[node_name] = validate_component(node_name, node)
        raw[node_name] = None
    top_keys = [f.name for f in dataclasses.fields(ExperimentConfig)]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw)
    except oc_errors.OmegaConfBaseException as exc:
        sub = getattr(exc, "full_key", "") or ""
        section = sub.split(".")[0]
        schema = {"train": TrainConfig, "eval": EvalConfig, "tracking": TrackingConfig,
                  "checkpoint": CheckpointConfig, "distributed": DistributedConfig,
                  "paper": PaperConfig, "requires": RequiredPath}.get(section)
        if sub.startswith("train.lr_schedule."):
            schema = LRScheduleConfig
        keys = [f.name for f in dataclasses.fields(schema)] if schema and "." in sub else top_keys
        raise node_error(exc, "", keys) from None
    for node_name, node in components.items():
        cfg[node_name] = node
    _check_resolvable(cfg)   # again, typed: `seed=${name}` resolves to a string
    _check_choices(cfg)
    _check_paper(cfg.paper)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_requires(raw: DictConfig) -> None:
    """Each `requires:` entry names a config key whose path must exist (an empty value is the
    user's deliberate choice, e.g. scenario.path="" for a generated set, and is not checked)."""
    import os

    items = raw.get("requires") or []
    fields = [f.name for f in dataclasses.fields(RequiredPath)]
    if not isinstance(items, (list, ListConfig)):
        raise ConfigError("bad value for 'requires': a list of {key: ..., what: ..., source: ...}")
    reqs = []
    for i, item in enumerate(items):
        try:
            req = OmegaConf.merge(OmegaConf.structured(RequiredPath), item)
            OmegaConf.to_container(req, throw_on_missing=True)
        except (oc_errors.OmegaConfBaseException, ValueError) as exc:
            raise node_error(exc, f"requires[{i}]", fields) from None
        reqs.append(req)
    for req in reqs:
        value = OmegaConf.select(raw, req.key, default=None)
        if value is None:
            raise ConfigError(f"requires: '{req.key}' is not set in this config; name a key the "
                              f"YAML sets to a path (e.g. scenario.path, model.path)")
        if value == "":
            continue
        if not Path(os.path.expanduser(str(value))).exists():
            where = f" (download: {req.source})" if req.source else ""
            raise ConfigError(f"{req.key}: not found: '{value}'. This config needs {req.what}"
                              f"{where}; put it on local disk and set {req.key}=<that path>")


def _check_paper(paper) -> None:
    """Every field but `note` is required, and `metric` must be a key lethe logs."""
    if paper is None:
        return
    from lethe.metrics.reference import lookup

    for name in ("citation", "table", "metric", "value"):
        if OmegaConf.is_missing(paper, name):
            raise ConfigError(f"missing value for 'paper.{name}': a paper block needs citation, "
                              f"table, metric and value (set paper.{name}: ... in the YAML)")
    if paper.value is None and not paper.note.lower().startswith("unverified"):
        raise ConfigError("paper.value is null: give the paper's number, or say why there is none "
                          "with paper.note: \"unverified: ...\"")
    if lookup(paper.metric) is None:
        raise ConfigError(f"bad value for 'paper.metric': '{paper.metric}' is not a metric lethe "
                          f"logs (see `lethe list metrics`, e.g. acc/avg_incremental or "
                          f"unlearn/forget_quality)")


def _check_resolvable(raw: DictConfig) -> None:
    """Every interpolation must resolve: a reference to a missing key is a user error here,
    not a crash once the run has started. The config keeps its interpolations (a run of
    `--seeds N` re-resolves `${seed}` per seed)."""
    refuse_outside_resolvers(raw, "config")
    try:
        OmegaConf.to_container(raw, resolve=True)
    except oc_errors.OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"cannot resolve the value of '{key}': {msg} (a ${{...}} reference must "
                          f"name a key of the config, e.g. ${{seed}} or ${{train.lr}})") from None


def _check_choices(cfg: DictConfig) -> None:
    registry.check_choice("train.optimizer", cfg.train.optimizer, CHOICES["train.optimizer"])
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(f"bad value for 'device': '{dev}' (use auto, cpu, cuda or cuda:N)")
    if OmegaConf.select(cfg, "train.batch_size") < 1:
        raise ConfigError("bad value for 'train.batch_size': must be ≥ 1")
    _check_epochs(cfg)
    if cfg.train.lr <= 0:
        raise ConfigError("bad value for 'train.lr': must be > 0")
    check_lr_schedule(cfg.train.lr_schedule)
    check_engine(cfg.train)
    check_distributed(cfg.distributed)
    _check_validation(cfg)


def _check_epochs(cfg: DictConfig) -> None:
    """train.epochs ≥ 1, except 0 for a TOFU stream started from a checkpoint already fine-tuned
    on TOFU (model.path): its learn experiences are then served without training."""
    epochs = cfg.train.epochs
    if epochs >= 1:
        return
    if epochs < 0 or cfg.scenario.get("name") != "tofu":
        raise ConfigError("bad value for 'train.epochs': must be ≥ 1 (0 is allowed only for "
                          "scenario.name=tofu with model.path a checkpoint already fine-tuned on TOFU)")
    if not cfg.model.get("path"):
        raise ConfigError("train.epochs=0 skips TOFU's fine-tuning, so the model must already be "
                          "fine-tuned on it: set model.path to that checkpoint (or train.epochs ≥ 1)")


def _check_validation(cfg: DictConfig) -> None:
    ev, ck = cfg.eval, cfg.checkpoint
    if ck.select not in ("last", "best"):
        raise ConfigError(f"bad value for 'checkpoint.select': '{ck.select}' (choose last or best)")
    if ck.select_metric not in ("val/acc", "val/loss"):
        raise ConfigError(f"bad value for 'checkpoint.select_metric': '{ck.select_metric}'"
                          f"{registry.suggest(ck.select_metric, ('val/acc', 'val/loss'))} "
                          f"(choose val/acc or val/loss)")
    if ev.every_epochs < 0 or ev.every_steps < 0:
        raise ConfigError("eval.every_epochs and eval.every_steps must be ≥ 0")
    validating = ev.every_epochs > 0 or ev.every_steps > 0
    if ck.select == "best" and not validating:
        raise ConfigError("checkpoint.select=best needs validation during training: set "
                          "eval.every_epochs=N or eval.every_steps=N")
    if validating and not 0 < ev.val_fraction < 1:
        raise ConfigError(f"bad value for 'eval.val_fraction': {ev.val_fraction} (must be in (0, 1))")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Flattened `a.b.c -> value` pairs, for MLflow params."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)

    values = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paper", "requires"):   # optional blocks: no params for configs without them
        if not values.get(key):
            values.pop(key, None)
    walk(values, "")
    return out
