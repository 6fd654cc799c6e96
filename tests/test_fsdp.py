"""distributed.strategy=fsdp beyond plain fine-tuning: LoRA/peft methods (LoKU, ReLearn), the
LoKU Fisher shared between ranks, checkpoints and --resume, validation with best-model copies.

Tolerances. A 2-process FSDP run differs from one process by float reassociation only: the
reduce-scatter sums the ranks' half-batch gradients in another order than one backward does,
and LoKU's Fisher sums its per-batch terms in another order (each rank half the batches, then
all_reduce); float32, ~1e-7 relative per operation, carried through a few dozen AdamW steps and
a seeded randomised SVD. The probabilities compared then agree to 1e-3 relative (the LM test of
tests/test_distributed.py measures ~1e-6 for gradient ascent); a wrong Fisher (one rank's half
only: every row weight off by a factor ~2), adapters left unsharded or a double-counted gradient
move them by far more. A resumed FSDP run repeats the uninterrupted run's arithmetic in the
same order, so it must be bitwise equal.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import ROOT, only_run, run_cli
from test_distributed import _artifact_text, _kill_all_mid_stream

from lethe.methods.loku import fisher_diagonal, relative_fisher_rows

KEYS = ("unlearn/forget_prob", "unlearn/model_utility", "unlearn/forget_ma")


def _tiny(tmp_path) -> list[str]:
    from tofu_helpers import small

    return [*small(tmp_path), "model.layers=1", "model.d_model=32", "model.heads=2",
            "scenario.el_n=30", "train.epochs=3", "method.epochs=3", "method.stop_at_target=false",
            "distributed.strategy=fsdp"]


def _cli(tmp_path, preset: str, extra: list[str], name: str, nproc: bool, timeout: int = 600):
    _generated_stream(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", preset, *extra, f"tracking.uri={uri}", f"tracking.experiment={name}",
            f"checkpoint.dir={tmp_path / name}", *(["--nproc", "2"] if nproc else [])]
    return run_cli(args, cwd=ROOT, timeout=timeout), uri, args


def _generated_stream(tmp_path) -> None:
    """Write the synthetic TOFU folder into the test's cache before any run: two ranks
    generating it together race on one temporary folder (lethe.scenarios.tofu.dataset_folder)."""
    from lethe.platform.config import load_config
    from lethe.scenarios.tofu import dataset_folder

    dataset_folder(load_config("ga_tofu_synthetic", _tiny(tmp_path)).scenario)


def _histories(uri: str, name: str) -> tuple:
    client, run = only_run(uri, name)
    return client, run, {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
                         for k in KEYS}


# --- LoRA/peft methods ------------------------------------------------------------------
@pytest.mark.integration
def test_lora_methods_under_fsdp_match_one_process(tmp_path):
    """ReLearn with LoRA (the official setting, dropout too): the adapters are added on an
    unsharded copy of the gathered weights and the wrapped model sharded again (every rank's
    share of each weight stays half), trained, merged and sharded again; the run ends FINISHED
    with the single-process run's forget metrics (see the module docstring for the tolerance).
    LoKU's match is checked by the resume test below (its uninterrupted 2-process run against
    one process); ReLearn's full fine-tuning (a sharded reference copy) is not run here, to
    keep the suite short."""
    finals = {}
    for name, nproc in (("two", True), ("one", False)):
        _, uri, finals[name] = _fsdp_or_one(tmp_path, "relearn_tofu_synthetic",
                                            ["method.rank=4", "method.alpha=8", "checkpoint.enabled=false"],
                                            name, nproc)
    _same_forget_metrics(finals["two"], finals["one"])


def _fsdp_or_one(tmp_path, preset: str, extra: list[str], name: str, nproc: bool):
    """One finished run (2 FSDP ranks, each holding half the weights, or one process):
    (run, uri, forget-metric histories)."""
    proc, uri, _ = _cli(tmp_path, preset, [*_tiny(tmp_path), *extra], name, nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FINISHED") == 1
    client, run, hist = _histories(uri, name)
    assert run.info.status == "FINISHED"
    if nproc:
        log = _artifact_text(client, run.info.run_id, "run.log", tmp_path / name)
        shares = re.findall(r"FSDP: 1 layers sharded over 2 ranks; this rank holds ([\d.]+)%", log)
        assert shares and all(49.0 <= float(s) <= 51.0 for s in shares), log[-2000:]
    return run, uri, hist


def _same_forget_metrics(two: dict, one: dict) -> None:
    finals = {"two": two, "one": one}
    for key, by_step in finals["one"].items():
        assert set(finals["two"][key]) == set(by_step) == {0, 1}, key
        for step, value in by_step.items():
            assert finals["two"][key][step] == pytest.approx(value, rel=1e-3), (key, step)
    # the unlearning changed the forget answers' probability (a no-op would pass the above)
    assert finals["one"]["unlearn/forget_prob"][1] != finals["one"]["unlearn/forget_prob"][0]


# --- the LoKU Fisher over ranks ----------------------------------------------------------
def _fisher_setup():
    """A tiny Llama, its LoRA targets and five (input, target) batches with different token
    counts, the same in every process (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    gen = torch.Generator().manual_seed(1)
    batches = []
    for k in range(5):
        x = torch.randint(0, 23, (2 + k % 2, 7), generator=gen)
        y = torch.randint(0, 23, x.shape, generator=gen)
        y[:, : k + 1] = -100
        batches.append((x, y))
    return lm, names, batches


def _fisher_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lm, names, batches = _fisher_setup()
        sums, n = fisher_diagonal(lm, batches, names, part=(rank, world))
        rows, n_f = relative_fisher_rows(lm, batches[:3], names, {k: v.clone() for k, v in sums.items()},
                                         n, part=(rank, world))
        torch.save({"sums": sums, "n": n, "rows": rows, "n_f": n_f}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_loku_fisher_shared_between_ranks_is_the_full_data_fisher(tmp_path):
    """Two gloo ranks, each differentiating half of the batches (rank::2) and all_reduce-ing
    its sums, hold the Fisher of all the batches: checked against an independent loop (each
    batch's gradient by .backward(), n_tok · g² summed in float64), and the relative Fisher's
    row sums against the formula Σ_j F_f[i, j] / (F_r[i, j] / N_r + eps)."""
    import torch.multiprocessing as mp

    from lethe.methods.loku import EPS

    out = str(tmp_path / "fisher")
    mp.spawn(_fisher_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    lm, names, batches = _fisher_setup()

    def reference(some):
        sums, tokens = {n: torch.zeros_like(lm.get_submodule(n).weight, dtype=torch.float64)
                        for n in names}, 0
        for x, y in some:
            lm.zero_grad()
            logits = lm(input_ids=x, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100).backward()
            count = int((y != -100).sum())
            for n in names:
                sums[n] += count * lm.get_submodule(n).weight.grad.double() ** 2
            tokens += count
        return sums, tokens

    lm.eval()
    f_r, n_r = reference(batches)
    f_f, n_f = reference(batches[:3])
    assert n_r == sum(int((y != -100).sum()) for _, y in batches)
    for rank in (0, 1):
        assert got[rank]["n"] == n_r and got[rank]["n_f"] == n_f
        for n in names:
            torch.testing.assert_close(got[rank]["sums"][n].double(), f_r[n], rtol=1e-5, atol=1e-12)
            rows = (f_f[n] / (f_r[n] / n_r + EPS)).sum(1)   # nn.Linear: W [out, in], rows = out
            torch.testing.assert_close(got[rank]["rows"][n], rows, rtol=1e-4, atol=1e-9)
    # one rank's half alone is not the full Fisher (the reduction is what makes it so)
    half, _ = reference(batches[0::2])
    assert not torch.allclose(half[names[0]], f_r[names[0]], rtol=1e-2)


# --- checkpoints and --resume ------------------------------------------------------------
@pytest.mark.integration
def test_fsdp_run_killed_then_resumed_matches_the_uninterrupted_run(tmp_path):
    """LoKU under FSDP with checkpoints: every rank takes part in gathering the whole state,
    rank 0 writes it in the single-process format (whole tensors, torch's numbered optimizer
    state), and on --resume every rank loads it and keeps its shard. Killed after the learn
    experience's checkpoint and resumed, the run ends where the uninterrupted run ends, bitwise
    (the same arithmetic in the same order)."""
    base = [*_tiny(tmp_path), "checkpoint.enabled=true"]
    whole, uri, whole_hist = _fsdp_or_one(tmp_path, "loku_tofu_synthetic", ["checkpoint.enabled=true"],
                                          "whole", nproc=True)
    # LoRA under FSDP: the uninterrupted 2-rank LoKU run is the single-process one
    _, _, one_hist = _fsdp_or_one(tmp_path, "loku_tofu_synthetic", ["checkpoint.enabled=false"],
                                  "one", nproc=False)
    _same_forget_metrics(whole_hist, one_hist)
    args = ["run", "loku_tofu_synthetic", *base, f"tracking.uri={uri}", "tracking.experiment=cut",
            f"checkpoint.dir={tmp_path / 'cut'}", "--nproc", "2"]
    assert _kill_all_mid_stream(args, tmp_path / "cut", after=1) == 1
    _, cut = only_run(uri, "cut")
    assert cut.info.status == "RUNNING"
    res = run_cli(args + ["--resume"], cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming run" in res.stdout
    _, run, hist = _histories(uri, "cut")
    assert run.info.run_id == cut.info.run_id and run.info.status == "FINISHED"
    assert hist == whole_hist                                   # steps 0 and 1, bitwise
    for key, value in whole.data.metrics.items():
        if not key.startswith("time/") and key != "unlearn/serve_s" and not math.isnan(value):
            assert run.data.metrics[key] == value, key
    mine = torch.load(tmp_path / "cut" / run.info.run_id / "state.pt", weights_only=True)["method"]
    theirs = torch.load(tmp_path / "whole" / whole.info.run_id / "state.pt", weights_only=True)["method"]
    assert mine["model"].keys() == theirs["model"].keys()
    for key in theirs["model"]:
        assert torch.equal(mine["model"][key], theirs["model"][key]), key
    # the single-process format: whole weights under the unsharded model's names (d_model=32:
    # the embedding is [vocab, 32], not half of it) and the optimizer's state numbered 0..P-1
    emb = theirs["model"]["lm.model.embed_tokens.weight"]
    assert emb.shape[1] == 32 and emb.shape[0] > 2
    optimizer = theirs["optimizer"]
    numbers = [i for g in optimizer["param_groups"] for i in g["params"]]
    assert numbers == list(range(len(theirs["model"])))
    assert set(optimizer["state"]) == set(numbers)
    first = next(iter(theirs["model"]))
    assert optimizer["state"][0]["exp_avg"].shape == theirs["model"][first].shape


# --- validation and the best-model copy --------------------------------------------------
@pytest.mark.integration
def test_fsdp_validation_selects_and_restores_the_best_model_as_one_process(tmp_path):
    """Gradient ascent (full fine-tuning: each rank holds half of every weight) with
    eval.every_epochs=1, checkpoint.select=best under FSDP: every rank validates the whole
    split with the sharded model, the best epoch's whole state is gathered to rank 0 and sharded
    back at the end of the experience. The validation curve, the selected epoch and the metrics
    after it are the single-process run's (tolerance: the module docstring)."""
    extra = ["checkpoint.enabled=false", "eval.every_epochs=1", "eval.val_fraction=0.2",
             "checkpoint.select=best", "checkpoint.select_metric=val/loss"]
    seen = {}
    for name, nproc in (("two", True), ("one", False)):
        run, uri, hist = _fsdp_or_one(tmp_path, "ga_tofu_synthetic", extra, name, nproc)
        client = only_run(uri, name)[0]
        val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"),
                                       key=lambda m: m.step)]
        seen[name] = (hist, val, run.data.metrics["select/epoch"])
    (two, val_two, epoch_two), (one, val_one, epoch_one) = seen["two"], seen["one"]
    assert len(val_one) == 3 and val_two == pytest.approx(val_one, rel=1e-4)   # one per epoch
    assert epoch_two == epoch_one
    best = min(range(3), key=lambda i: val_one[i])   # select/epoch counts epochs from 1
    assert epoch_one == best + 1
    for key, by_step in one.items():
        for step, value in by_step.items():
            assert two[key][step] == pytest.approx(value, rel=1e-3), (key, step)


def _stepped_setup():
    """lethe's tiny Llama (logits [B, V, L]) and one batch, the same in every process."""
    from lethe.models.hf import HFCausalLMConfig, hf_causal_lm
    from lethe.models.vision import ModelInfo

    _, _, batches = _fisher_setup()
    torch.manual_seed(0)
    model = hf_causal_lm(HFCausalLMConfig(arch="llama", layers=1, d_model=16, heads=2),
                         ModelInfo(input_shape=(7,), n_classes=23))
    return model, batches[1]


def _gather_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from lethe.engine import distributed as D

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, (x, y) = _stepped_setup()
        D.fully_shard_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        # the same batch on both ranks: the reduce-scatter mean is its gradient
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        weights, opt_state = D.full_model_state(model), D.full_optimizer_state(model, opt)
        saved = {k: v.clone() for k, v in weights.items()}
        with torch.no_grad():   # spoil every shard, then restore the copy sent by rank 0
            for p in model.parameters():
                p.mul_(0.5)
        D.load_full_model_state(model, saved if rank == 0 else {}, from_rank0=True)
        restored = D.full_model_state(model, everywhere=True)
        torch.save({"weights": weights, "optimizer": opt_state, "restored": restored,
                    "share": sum(p.to_local().numel() for p in model.parameters())}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_whole_state_of_a_sharded_model_is_the_unsharded_one_and_restores(tmp_path):
    """What checkpoints and the best-model copy rely on, with two gloo ranks: after one AdamW
    step, rank 0's gathered model and optimizer state equal one process's own state_dicts after
    the same step (the same batch on both ranks: the reduce-scatter mean of two equal gradients
    is that gradient), in torch's numbered optimizer format; the other rank gets nothing; the
    copy sent back by rank 0 restores every rank's spoiled shards."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "state")
    mp.spawn(_gather_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    model, (x, y) = _stepped_setup()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ref, ref_opt = model.state_dict(), opt.state_dict()
    total = sum(p.numel() for p in model.parameters())
    assert got[0]["share"] + got[1]["share"] == total and got[0]["share"] < total
    assert got[1]["weights"] == {} and got[1]["optimizer"] == {}
    assert got[0]["weights"].keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(got[0]["weights"][key], value, rtol=1e-6, atol=1e-7)
        for rank in (0, 1):
            assert torch.equal(got[rank]["restored"][key], got[0]["weights"][key]), key
    mine = got[0]["optimizer"]
    assert [g["params"] for g in mine["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    for i, state in ref_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine["state"][i][name], state[name], rtol=1e-5, atol=1e-9)
