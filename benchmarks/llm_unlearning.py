"""LLM unlearning side by side: gradient ascent vs LoKU vs ReLearn at the same forget target (issue 9).

One process, one generated fictitious-author set (lethe/scenarios/tofu_synthetic.py), one tiny
Llama, one seed: each method runs its preset (conf/{ga,loku,relearn}_tofu_synthetic.yaml)
through ``lethe run``'s code path — fine-tune on every author, then serve the deletion request
of 10% of them — and unlearns until the forget target is met: memorisation accuracy on the
forget answers at or below its value on unseen authors' answers (Jang et al., 2023;
``method.stop_at_target``), or its epoch cap (reported). The retain-only model behind forget
quality and PrivLeak is trained once and shared.

Printed per method: model utility (TOFU), forget quality (KS p-value vs the retain-only model),
Linguistic Score of the answers to forget questions (ReLearn; its perplexity from the presets'
judge, ``scenario.ppl_model: wordfreq`` — a unigram model of real English word frequencies, the
offline stand-in for the external fluent LLM of ReLearn's evaluation: a tiny model trained on
a few hundred QA pairs is no judge of fluency, and its own greedy answers always look likely
to it), KFR / KRR, forget / unseen MA,
whether the target was met, unlearning steps and wall time (unlearning only, and the whole
run). The papers' central claims, as goals: LoKU keeps more model utility than gradient ascent
(a > b), ReLearn's answers are more fluent than gradient ascent's (c > d).

    .venv/bin/python benchmarks/llm_unlearning.py [--seed 0] [--device cpu] [--embedder minilm] [--threads 1]
        [key=value ...]     # config overrides for every method, e.g. scenario.ppl_model=self

Last line: ``loku_utility=<a> ga_utility=<b> relearn_ls=<c> ga_ls=<d>``.
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


def method_config(short: str, args, store: str):
    from lethe.platform.config import load_config

    overrides = [f"seed={args.seed}", f"device={args.device}", f"tracking.uri={store}",
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--embedder", default="minilm", help="KFR/KRR entity matcher: minilm | exact")
    p.add_argument("--tracking-uri", default="", help="MLflow store (default: a temporary SQLite file)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (tiny models run fastest on one; 0 = torch's default)")
    p.add_argument("overrides", nargs="*", help="config overrides for every method (key=value)")
    args = p.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    tmp = tempfile.mkdtemp(prefix="lethe_llm_unlearning_")
    store = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
    # every config checked before the first method runs: a bad override fails at once
    cfgs = {short: method_config(short, args, store) for short, _ in METHODS}
    results, references = {}, {}
    for short, name in METHODS:
        final, wall = run_method(cfgs[short], references)
        results[short] = (final, wall)
        print(f"{name}: done in {wall:.1f} s", flush=True)
    print(f"\nseed {args.seed}, device {args.device}, MLflow store {store}")
    print(f"{'method':<12}" + "".join(f"{c:>10}" for c, _ in COLUMNS) + f"{'run_s':>9}")
    for short, name in METHODS:
        final, wall = results[short]
        print(f"{name:<12}" + "".join(f"{final.get(k, float('nan')):>10.4g}" for _, k in COLUMNS)
              + f"{wall:>9.1f}")
    missed = [name for short, name in METHODS if results[short][0].get("unlearn/target_reached") != 1.0]
    if missed:
        print(f"note: {', '.join(missed)} stopped at the epoch cap before the forget target")
    a = results["loku"][0]["unlearn/model_utility"]
    b = results["ga"][0]["unlearn/model_utility"]
    c = results["relearn"][0]["unlearn/forget_ls"]
    d = results["ga"][0]["unlearn/forget_ls"]
    print(f"goals: loku_utility > ga_utility: {'met' if a > b else 'NOT met'}; "
          f"relearn_ls > ga_ls: {'met' if c > d else 'NOT met'}")
    print(f"loku_utility={a:.4g} ga_utility={b:.4g} relearn_ls={c:.4g} ga_ls={d:.4g}")
    return 0


if __name__ == "__main__":
    from lethe.errors import LetheError

    try:
        raise SystemExit(main())
    except LetheError as exc:   # bad config / input: the message, no traceback (runs marked FAILED)
        print(f"llm_unlearning: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
