"""Replay with an exact per-batch fraction — the data half of Ibrahim et al. (2024).

"Simple and Scalable Strategies to Continually Pre-train Large Language Models" (Ibrahim,
Thérien, Gupta, Richter, Anthony, Lesort, Belilovsky, Rish; TMLR 2024). For each new dataset
they re-warm and re-decay the learning rate (``train.lr_schedule.name=rewarm_cosine``, or
the ``infinite`` schedule that needs no re-warming; lethe/engine/schedules.py, usable by
every method) and replay a fixed fraction of every batch from earlier data: 1–5% under a
weak distribution shift, ~25% under a strong one.

Unlike Avalanche's ReplayPlugin (which concatenates a buffer batch of its own size to each
batch), every batch here has exactly ``batch_size`` samples, ``replay_frac·batch_size`` of
them drawn from the buffer; the new experience's data fills the remaining slots (the last
incomplete batch of an epoch is dropped, so every batch keeps the exact fraction). By
default replay is compute-equivalent, as in the paper: an epoch has as many steps as it would
without replay, so each epoch sees a (1 − replay_frac) share of the new data (a different
random share each epoch). The paper makes a single pass over each new dataset, so a fixed
(1 − f) share is seen once and the rest never; with train.epochs = E > 1 lethe redraws the
share every epoch, so about 1 − f^E of the new samples are seen at least once (some more
often) — a documented generalisation, not the paper's setting: use train.epochs=1 (or
compute_equivalent=false: every new sample each epoch, more steps) to compare with it. The
first experience has no buffer and trains on plain batches. A run should show: lower
forgetting with replay_frac=0.25 than with 0 on a strongly shifting stream (split digits,
class-incremental), same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

from lethe.errors import ConfigError, RunError
from lethe.methods.base import Method
from lethe.registry import register_method

POLICIES = ("all", "reservoir", "balanced")


@dataclass
class RewarmReplayConfig:
    replay_frac: float = 0.25     # share of every batch replayed (paper: 0.01–0.05 weak shift,
                                  # 0.25 strong shift); replay_frac·train.batch_size must be whole
    buffer_policy: str = "all"    # all: every earlier sample (the paper keeps old datasets) |
                                  # reservoir: uniform over the stream, mem_size slots |
                                  # balanced: mem_size split evenly over earlier experiences
    mem_size: int = 500           # buffer capacity (reservoir, balanced)
    compute_equivalent: bool = True  # steps per epoch as without replay (replay takes batch
                                     # slots from new data, the paper's compute-equivalent
                                     # replay); False: every new sample each epoch, more steps


def _mix_seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2 ** 62)
    return seed


class MixedBatchSampler:
    """Index batches over ConcatDataset([new, buffer]): ``n_new`` new indices (a fresh
    permutation each epoch) plus ``n_replay`` buffer indices (drawn without replacement,
    reshuffled whenever the buffer is used up). Seeded per (seed, experience, epoch), so a
    resumed run draws the same batches."""

    def __init__(self, n_new_data: int, n_buffer: int, n_new: int, n_replay: int, seed: int,
                 compute_equivalent: bool = True):
        self.n_new_data, self.n_buffer = n_new_data, n_buffer
        self.n_new, self.n_replay, self.seed = n_new, n_replay, seed
        batch = n_new + n_replay
        self.steps = n_new_data // (batch if compute_equivalent else n_new)
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch))
        self.epoch += 1
        new = torch.randperm(self.n_new_data, generator=g)
        pool, pos = torch.randperm(self.n_buffer, generator=g), 0
        for b in range(len(self)):
            replay = []
            while len(replay) < self.n_replay:
                if pos == len(pool):
                    pool, pos = torch.randperm(self.n_buffer, generator=g), 0
                take = min(self.n_replay - len(replay), len(pool) - pos)
                replay += pool[pos:pos + take].tolist()
                pos += take
            yield (new[b * self.n_new:(b + 1) * self.n_new].tolist()
                   + [self.n_new_data + j for j in replay])


@register_method("rewarm_replay", config=RewarmReplayConfig, kinds=("learn",))
class RewarmReplay(Method):
    """Exact-fraction replay of earlier experiences (pair with train.lr_schedule)."""

    name = "rewarm_replay"

    def __init__(self, cfg, model, ctx):
        b = int(ctx.train.batch_size)
        if not 0 <= cfg.replay_frac < 1:
            raise ConfigError(f"method.replay_frac: {cfg.replay_frac} must be in [0, 1)")
        r = cfg.replay_frac * b
        if abs(r - round(r)) > 1e-9:
            hint = [bs for bs in range(b, 4 * b + 1) if abs(cfg.replay_frac * bs - round(cfg.replay_frac * bs)) < 1e-9]
            raise ConfigError(f"method.replay_frac={cfg.replay_frac} × train.batch_size={b} = {r:g} "
                              f"is not a whole number of samples; every batch must hold exactly that "
                              f"fraction (try train.batch_size={hint[0] if hint else 100})")
        if cfg.buffer_policy not in POLICIES:
            raise ConfigError(f"method.buffer_policy: '{cfg.buffer_policy}' must be one of "
                              f"{', '.join(POLICIES)}")
        if cfg.buffer_policy != "all" and cfg.mem_size < 1:
            raise ConfigError(f"method.mem_size must be ≥ 1 with buffer_policy={cfg.buffer_policy}")
        self.n_replay = int(round(r))
        self.n_new = b - self.n_replay
        super().__init__(cfg, model, ctx)
        import torch

        # the buffer as slots: (stream index of the experience, sample id) in slot order
        self.buf_exp = torch.zeros(0, dtype=torch.long)
        self.buf_id = torch.zeros(0, dtype=torch.long)
        self.seen = 0                  # samples offered to the reservoir so far

    # --- training -------------------------------------------------------------------------
    def learn(self, experience) -> None:
        self.current_index = experience.index
        super().learn(experience)
        self._add_to_buffer(experience)

    def before_training_exp(self, strategy, **kwargs):
        import torch

        if self.n_replay == 0 or len(self.buf_id) == 0:
            return    # first experience (or no replay): Avalanche's own loader
        new = strategy.adapted_dataset
        buffer = self._buffer_dataset()
        sampler = MixedBatchSampler(len(new), len(buffer), self.n_new, self.n_replay,
                                    _mix_seed(self.ctx.seed, self.current_index),
                                    self.cfg.compute_equivalent)
        if len(sampler) == 0:
            raise RunError(f"experience {self.current_index} has {len(new)} samples, too few for one "
                           f"batch of {self.n_new + self.n_replay}; lower train.batch_size")
        strategy.dataloader = torch.utils.data.DataLoader(
            torch.utils.data.ConcatDataset([new, buffer]), batch_sampler=sampler,
            num_workers=self.ctx.train.num_workers, collate_fn=getattr(new, "collate_fn", None))

    # --- the buffer -----------------------------------------------------------------------
    def _by_index(self):
        return {e.index: e for e in self.ctx.stream.experiences}

    def _buffer_dataset(self):
        import torch

        exps = self._by_index()
        parts = []
        for e in self.buf_exp.unique().tolist():
            data = exps[e].train.dataset
            pos = {int(s): i for i, s in enumerate(data.sample_id)}
            ids = self.buf_id[self.buf_exp == e].tolist()
            parts.append(data.train().subset([pos[i] for i in ids]))
        return torch.utils.data.ConcatDataset(parts)

    def _add_to_buffer(self, experience) -> None:
        import torch

        ids = torch.as_tensor(list(experience.train.dataset.sample_id), dtype=torch.long)
        g = torch.Generator().manual_seed(_mix_seed(self.ctx.seed, experience.index, 7))
        ids = ids[torch.randperm(len(ids), generator=g)]   # arrival order / random subset order
        tag = torch.full_like(ids, experience.index)
        policy, cap = self.cfg.buffer_policy, int(self.cfg.mem_size)
        if policy == "all":
            self.buf_exp, self.buf_id = torch.cat([self.buf_exp, tag]), torch.cat([self.buf_id, ids])
        elif policy == "reservoir":   # Vitter's algorithm R over the stream of samples
            exp_l, id_l = self.buf_exp.tolist(), self.buf_id.tolist()
            for e, s in zip(tag.tolist(), ids.tolist()):
                if len(id_l) < cap:
                    exp_l.append(e)
                    id_l.append(s)
                else:
                    j = int(torch.randint(0, self.seen + 1, (1,), generator=g))
                    if j < cap:
                        exp_l[j], id_l[j] = e, s
                self.seen += 1
            self.buf_exp, self.buf_id = torch.tensor(exp_l, dtype=torch.long), torch.tensor(id_l, dtype=torch.long)
        else:                          # balanced: equal quotas, leftovers to the earliest
            groups = [(e, self.buf_id[self.buf_exp == e]) for e in self.buf_exp.unique().tolist()]
            groups.append((experience.index, ids))
            quota = [cap // len(groups) + (1 if k < cap % len(groups) else 0) for k in range(len(groups))]
            kept = [(e, g_ids[:q]) for (e, g_ids), q in zip(groups, quota)]
            self.buf_exp = torch.cat([torch.full_like(i, e) for e, i in kept])
            self.buf_id = torch.cat([i for _, i in kept])

    # --- checkpoints ------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"buf_exp": self.buf_exp.clone(), "buf_id": self.buf_id.clone(), "seen": int(self.seen)}

    def load_extra_state(self, state: dict) -> None:
        self.buf_exp, self.buf_id = state["buf_exp"].long(), state["buf_id"].long()
        self.seen = int(state["seen"])
