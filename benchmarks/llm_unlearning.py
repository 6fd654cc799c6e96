"""LLM unlearning side by side: gradient ascent vs LoKU vs ReLearn at the same forget target (issue 9).

One process, one generated fictitious-author set (lethe/scenarios/tofu_synthetic.py), one tiny
Llama per seed: each method runs its preset (conf/{ga,loku,relearn}_tofu_synthetic.yaml)
through ``lethe run``'s code path — fine-tune on every author, then serve the deletion request
of 10% of them — and unlearns until the forget target is met: memorisation accuracy on the
forget answers at or below its value on unseen authors' answers (Jang et al., 2023;
``method.stop_at_target``), or its epoch cap (reported). The retain-only model behind forget
quality and PrivLeak is trained once per seed and shared.

Printed per method: model utility (TOFU), forget quality (KS p-value vs the retain-only model),
Linguistic Score of the answers to forget questions (ReLearn; its perplexity from the presets'
judge, ``scenario.ppl_model: wordfreq`` — a unigram model of real English word frequencies, the
offline stand-in for the external fluent LLM of ReLearn's evaluation: a tiny model trained on
a few hundred QA pairs is no judge of fluency, and its own greedy answers always look likely
to it), KFR / KRR, forget / unseen MA,
whether the target was met, unlearning steps and wall time (unlearning only, and the whole
run). The papers' central claims, as goals: LoKU keeps more model utility than gradient ascent
(a > b), ReLearn's answers are more fluent than gradient ascent's (c > d).

    .venv/bin/python benchmarks/llm_unlearning.py [--seed 0] [--seeds 1] [--device cpu] [--embedder minilm]
        [--threads 1] [key=value ...]   # config overrides for every method, e.g. scenario.ppl_model=self

With ``--seeds N`` (seeds --seed .. --seed + N - 1) the per-seed tables are followed by each
figure's mean ± 95% CI per method (Student t, N - 1 degrees of freedom) and, for each claim, on
how many seeds it holds and the paired mean difference ± its CI.

Last line: ``loku_utility=<a> ga_utility=<b> relearn_ls=<c> ga_ls=<d>`` (means over the seeds
when several run).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = (("ga", "grad_ascent"), ("loku", "loku"), ("relearn", "relearn"))
COLUMNS = (("utility", "unlearn/model_utility"), ("forget_q", "unlearn/forget_quality"),
           ("LS", "unlearn/forget_ls"), ("KFR", "unlearn/kfr"), ("KRR", "unlearn/krr"),
           ("MA_f", "unlearn/forget_ma"), ("MA_u", "unlearn/unseen_ma"),
           ("target", "unlearn/target_reached"), ("steps", "unlearn/unlearn_steps"),
           ("unlearn_s", "unlearn/serve_s"))


SUMMARY = ("utility", "forget_q", "LS", "KFR", "KRR", "steps")   # the figures given as mean ± CI
# the papers' claims, as (label, (method, figure) on the left, (method, figure) on the right)
CLAIMS = (("loku_utility > ga_utility", ("loku", "unlearn/model_utility"), ("ga", "unlearn/model_utility")),
          ("relearn_ls > ga_ls", ("relearn", "unlearn/forget_ls"), ("ga", "unlearn/forget_ls")))


def method_config(short: str, seed: int, args, store: str):
    from lethe.platform.config import load_config

    overrides = [f"seed={seed}", f"device={args.device}", f"tracking.uri={store}",
                 "tracking.experiment=llm_unlearning_benchmark", f"scenario.embedder={args.embedder}",
                 f"checkpoint.dir={os.path.join(os.path.dirname(store.split(':///')[-1]), 'ckpt')}",
                 *args.overrides]
    return load_config(str(ROOT / "conf" / f"{short}_tofu_synthetic.yaml"), overrides)


def run_method(cfg, references: dict) -> tuple[dict, float]:
    """One method's run; ``references`` caches the retain-only model across the methods (it
    depends on scenario, model, train settings and seed only: the same for all three)."""
    from lethe.platform.runner import run_experiment

    t0 = time.perf_counter()
    result = run_experiment(cfg, reference_cache=references)
    return result.final, time.perf_counter() - t0


def run_seed(seed: int, cfgs: dict) -> dict:
    """The three methods on one seed: {short: (final metrics, run wall s)}."""
    results, references = {}, {}   # a fresh retain-only model per seed (it depends on the seed)
    for short, name in METHODS:
        results[short] = run_method(cfgs[short], references)
        print(f"seed {seed} {name}: done in {results[short][1]:.1f} s", flush=True)
    return results


def print_seed_table(seed: int, results: dict, device: str, store: str) -> None:
    print(f"\nseed {seed}, device {device}, MLflow store {store}")
    print(f"{'method':<12}" + "".join(f"{c:>10}" for c, _ in COLUMNS) + f"{'run_s':>9}")
    for short, name in METHODS:
        final, wall = results[short]
        print(f"{name:<12}" + "".join(f"{final.get(k, float('nan')):>10.4g}" for _, k in COLUMNS)
              + f"{wall:>9.1f}")
    missed = [name for short, name in METHODS if results[short][0].get("unlearn/target_reached") != 1.0]
    if missed:
        print(f"note: {', '.join(missed)} stopped at the epoch cap before the forget target")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t, n - 1 degrees of
    freedom); the half-width is nan for a single value."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)


def claim_values(per_seed: dict, side: tuple[str, str]) -> list[float]:
    short, key = side
    return [per_seed[seed][short][0].get(key, float("nan")) for seed in per_seed]


def print_summary(per_seed: dict) -> None:
    """Mean ± 95% CI of each figure per method over the seeds, then each claim: on how many
    seeds it holds and the paired mean difference (left - right, seed by seed) ± its CI."""
    keys = dict(COLUMNS)
    print(f"\nmean ± 95% CI over {len(per_seed)} seeds ({', '.join(map(str, per_seed))}), Student t")
    print(f"{'method':<12}" + "".join(f"{c:>22}" for c in SUMMARY) + f"{'target met':>12}")
    for short, name in METHODS:
        cells = [mean_ci(claim_values(per_seed, (short, keys[c]))) for c in SUMMARY]
        met = sum(r[short][0].get("unlearn/target_reached") == 1.0 for r in per_seed.values())
        print(f"{name:<12}" + "".join(f"{f'{m:.4g} ± {h:.2g}':>22}" for m, h in cells)
              + f"{f'{met}/{len(per_seed)}':>12}")
    for label, left, right in CLAIMS:
        diffs = [a - b for a, b in zip(claim_values(per_seed, left), claim_values(per_seed, right))]
        m, h = mean_ci(diffs)
        verdict = ("one seed" if h != h else "CI above 0" if m - h > 0 else "CI below 0" if m + h < 0
                   else "CI includes 0")
        print(f"claim {label}: holds on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds; "
              f"paired mean difference {m:.4g} ± {h:.2g} ({verdict})")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the (first) seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="how many seeds: --seed, --seed + 1, ...; > 1 adds mean ± 95%% CI and the claims' "
                        "per-seed tally")
    p.add_argument("--device", default="cpu")
    p.add_argument("--embedder", default="minilm", help="KFR/KRR entity matcher: minilm | exact")
    p.add_argument("--tracking-uri", default="", help="MLflow store (default: a temporary SQLite file)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (tiny models run fastest on one; 0 = torch's default)")
    p.add_argument("overrides", nargs="*", help="config overrides for every method (key=value)")
    args = p.parse_args()
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")   # argparse: exit 2
    return args


def main() -> int:
    args = parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    tmp = tempfile.mkdtemp(prefix="lethe_llm_unlearning_")
    store = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
    seeds = list(range(args.seed, args.seed + args.seeds))
    # every config checked before the first method runs: a bad override fails at once
    cfgs = {seed: {short: method_config(short, seed, args, store) for short, _ in METHODS} for seed in seeds}
    t0 = time.perf_counter()
    per_seed = {seed: run_seed(seed, cfgs[seed]) for seed in seeds}
    wall = time.perf_counter() - t0
    for seed in seeds:
        print_seed_table(seed, per_seed[seed], args.device, store)
    if len(seeds) > 1:
        print_summary(per_seed)
    print(f"total wall time {wall:.1f} s for {len(seeds)} seed(s)")
    # the last line: one seed's figures, or their means over the seeds
    a, b, c, d = (mean_ci(claim_values(per_seed, side))[0] for _, *sides in CLAIMS for side in sides)
    print(f"goals: loku_utility > ga_utility: {'met' if a > b else 'NOT met'}; "
          f"relearn_ls > ga_ls: {'met' if c > d else 'NOT met'}" + (" (means)" if len(seeds) > 1 else ""))
    print(f"loku_utility={a:.4g} ga_utility={b:.4g} relearn_ls={c:.4g} ga_ls={d:.4g}")
    return 0


if __name__ == "__main__":
    from lethe.errors import LetheError

    try:
        raise SystemExit(main())
    except LetheError as exc:   # bad config / input: the message, no traceback (runs marked FAILED)
        print(f"llm_unlearning: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
