"""The one metrics reference: every key lethe logs, its formula, variant and source.

`lethe list metrics` prints it and `docs/metrics.md` is generated from it
(`python -m lethe.metrics.reference > docs/metrics.md`); a test checks that the file is
up to date and that every key logged by the test suite's runs matches an entry here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricDoc:
    key: str          # <j>/<k>/<i> stand for integers, <name> for a word
    formula: str
    variant: str      # which variant of a metric with this name it is
    source: str       # paper (or tool) that defines it
    differs: str = ""  # how it differs from what other tools report under the same name


R = "R[i, j] = accuracy on test experience j after the i-th learn experience"

METRICS: tuple[MetricDoc, ...] = (
    MetricDoc("acc/exp_<j>", "R[i, j] at step i", "last-model accuracy per experience",
              "standard", "Avalanche: Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp00j (same value)"),
    MetricDoc("acc/avg_seen", "mean_{j ≤ i} R[i, j]", "average accuracy over seen experiences",
              "Chaudhry et al., ECCV 2018 (A_k)",
              "weights seen experiences equally; PyCIL/PILOT's per-step accuracy is sample-weighted "
              "(acc/last), and their 'average incremental accuracy' is acc/avg_incremental"),
    MetricDoc("acc/last", "hits / samples over the test data of every experience seen so far, at step i",
              "last accuracy (sample-weighted over all seen classes)",
              "Rebuffi et al., iCaRL, CVPR 2017; PyCIL / PILOT (Zhou et al., 2023) 'last accuracy'",
              "= acc/avg_seen only when the seen experiences have equally many test samples"),
    MetricDoc("acc/avg_incremental", "mean over learn steps t ≤ i of acc/last after step t (experiences "
              "0..t seen then)", "average incremental accuracy",
              "Rebuffi et al., iCaRL, CVPR 2017; PyCIL / PILOT / MOS (e.g. MOS's 93.30 on CIFAR-100 B0 Inc5)",
              "forget / update steps are not incremental steps and do not enter the mean; "
              "not the mean of acc/avg_seen (that one weights experiences equally)"),
    MetricDoc("acc/avg_all", "mean_j R[i, j] over all experiences, seen or not", "all-experience accuracy",
              "standard", "Avalanche's Top1_Acc_Stream weights by samples; this weights experiences equally"),
    MetricDoc("forgetting/avg", "mean_{j < i} (max_{l < i} R[l, j] − R[i, j])", "Chaudhry (max-based)",
              "Chaudhry et al., Riemannian Walk, ECCV 2018",
              "Avalanche's 'Forgetting' is first-value based, R[j, j] − R[i, j] (= −BWT per experience); "
              "after a forget/update step lethe compares the current model on all seen experiences"),
    MetricDoc("bwt", "mean_{j < i} (R[i, j] − R[j, j])", "backward transfer (negative = forgetting)",
              "Lopez-Paz & Ranzato, GEM, NeurIPS 2017"),
    MetricDoc("fwt", "mean_{1 ≤ j ≤ i} (R[j−1, j] − b[j]), b = accuracy of the untrained model",
              "forward transfer", "Lopez-Paz & Ranzato, GEM, NeurIPS 2017",
              "needs eval.initial=true; some tools use a separately trained random baseline for b"),
    MetricDoc("nfr/prev", "mean[f_prev correct ∧ f_now wrong] over the whole test set",
              "negative flip rate vs the previous evaluation point", "Yan et al., PCT, CVPR 2021"),
    MetricDoc("pfr/prev", "mean[f_prev wrong ∧ f_now correct]", "positive flip rate vs the previous point",
              "Yan et al., PCT, CVPR 2021"),
    MetricDoc("nfi/prev", "#negative flips / #errors of f_now", "negative flip impact",
              "Echterhoff et al., MUSCLE, 2024"),
    # model updates (scenario model_update; lethe/metrics/compat.py): version k = the model
    # deployed after the k-th update experience; logged after every update from version 1 on
    MetricDoc("rel_nfr/prev", "NFR / ((1 − ER_prev) · ER_now), ER = error rate",
              "relative NFR vs the previous model version (1 = as many flips as two independent "
              "models with these error rates)", "Yan et al., PCT, CVPR 2021 (Eq. 11)"),
    MetricDoc("nfr/v<k>", "mean[f_vk correct ∧ f_now wrong]", "negative flip rate vs model version k",
              "Yan et al., PCT, CVPR 2021"),
    MetricDoc("pfr/v<k>", "mean[f_vk wrong ∧ f_now correct]", "positive flip rate vs model version k",
              "Yan et al., PCT, CVPR 2021"),
    MetricDoc("nfi/v<k>", "#negative flips vs version k / #errors of f_now",
              "negative flip impact vs model version k", "Echterhoff et al., MUSCLE, 2024"),
    MetricDoc("rel_nfr/v<k>", "nfr/v<k> / ((1 − ER_vk) · ER_now)", "relative NFR vs model version k",
              "Yan et al., PCT, CVPR 2021 (Eq. 11)"),
    MetricDoc("acc/version", "accuracy of the newly deployed model version on the whole test set",
              "—", "standard"),
    MetricDoc("acc/gain_prev", "acc(f_now) − acc(f_prev) on the test set",
              "accuracy gain of the update, logged next to nfr/prev", "—"),
    MetricDoc("acc/gain_v<k>", "acc(f_now) − acc(f_vk)", "accuracy gain vs model version k", "—"),
    MetricDoc("muscle/mask_frac", "share of adapter-training samples where the new version was wrong "
              "(taught by the old version)", "MUSCLE's mask m = 𝟙[argmax p_new ≠ y], per sample",
              "Echterhoff et al., MUSCLE, 2024"),
    MetricDoc("muscle/adapter_params", "trainable parameters of the LoRA compatibility adapter",
              "—", "Echterhoff et al., MUSCLE, 2024"),
    MetricDoc("loss/exp_<j>", "L[i, j] = mean next-token cross-entropy (nats per token) on corpus j's "
              "held-out blocks after step i", "LM streams (task_type lm): held-out loss per corpus",
              "standard LM evaluation",
              "on LM streams acc/* are next-token top-1 accuracies and forgetting/bwt/nfr use them"),
    MetricDoc("ppl/exp_<j>", "exp(L[i, j])", "held-out perplexity per corpus (LM streams)",
              "standard LM evaluation", "token-level (not word-level) perplexity of the stream's tokenizer"),
    MetricDoc("loss/avg_seen", "mean_{j ≤ i} L[i, j]", "held-out loss averaged over seen corpora "
              "(corpora weighted equally)", "—"),
    MetricDoc("ppl/avg_seen", "exp(loss/avg_seen)", "geometric mean of the seen corpora's perplexities",
              "—", "not the arithmetic mean of ppl/exp_<j>"),
    MetricDoc("forgetting/loss_avg", "mean_{j < i} (L[i, j] − min_{l < i} L[l, j])",
              "rise in held-out loss on earlier corpora (max-based, like Chaudhry's)",
              "loss analogue of Chaudhry et al., ECCV 2018", "positive = forgetting"),
    MetricDoc("em/exp_<j>", "mean over corpus j's held-out blocks of 𝟙[the last 4 next-token "
              "predictions are all right]", "continuation exact match (LM streams)", "—",
              "teacher-forced argmax; all right ⇔ greedy decoding reproduces the continuation"),
    MetricDoc("em/version", "exact-match rate of the newly deployed model version (LM update streams)",
              "—", "—"),
    MetricDoc("em_nfr/prev", "mean over held-out blocks of 𝟙[f_prev exact match ∧ f_now not]",
              "negative flip rate on exact match vs the previous version", "Echterhoff et al., MUSCLE, 2024"),
    MetricDoc("em_nfr/v<k>", "mean[f_vk exact match ∧ f_now not]", "exact-match NFR vs version k",
              "Echterhoff et al., MUSCLE, 2024"),
    MetricDoc("em_pfr/prev", "mean[f_prev not exact match ∧ f_now exact match]",
              "exact-match positive flip rate vs the previous version", "—"),
    MetricDoc("em_pfr/v<k>", "mean[f_vk not exact match ∧ f_now exact match]",
              "exact-match positive flip rate vs version k", "—"),
    MetricDoc("sdf/prev", "mean over blocks of 𝟙[s_now < s_prev − τ], s = token accuracy of the "
              "block's last 4 predictions, τ = 0", "score-drop flip rate on a continuous metric",
              "Echterhoff et al., MUSCLE, 2024 (flips of continuous scores)"),
    MetricDoc("sdf/v<k>", "mean[s_now < s_vk − τ]", "score-drop flip rate vs version k",
              "Echterhoff et al., MUSCLE, 2024"),
    MetricDoc("params/trainable", "parameters with requires_grad in the latest stage",
              "trainable parameters of the method", "—"),
    MetricDoc("params/frac_trainable", "params/trainable / all parameters of the model",
              "trainable share", "—"),
    MetricDoc("params/stored_bytes_per_task", "bytes of the parameters kept per task (e.g. one LoRA "
              "expert + head)", "per-task storage", "—"),
    MetricDoc("hft/frac_frozen", "frozen units / all units (attention and FFN matrices, norms) of the "
              "transformer layers in the latest stage", "HFT's half freezing (≈ 0.5)",
              "Hui et al., HFT, 2024"),
    MetricDoc("conpet/selector_acc", "mean[argmax selector(x) = task of x] over the test samples of "
              "the seen tasks", "task-routing accuracy of ConPET's PET selector",
              "Song et al., ConPET, 2023", "logged from the second task on"),
    MetricDoc("conpet/selector_train_acc", "selector accuracy on its replay batches in its last epoch",
              "training-side routing accuracy", "Song et al., ConPET, 2023"),
    MetricDoc("train/loss", "mean training loss of the epoch (or mini-batch with train.log_every_iter)",
              "Avalanche Loss_Epoch / Loss_MB", "Avalanche", "step axis = training iterations"),
    MetricDoc("train/lr", "learning rate of parameter group 0", "per epoch, or per step with a schedule",
              "—", "step axis = training iterations"),
    MetricDoc("avalanche/<name>", "the value of an Avalanche metric a method adds to the run's "
              "evaluation plugin, under its Avalanche name with / replaced by _",
              "as the Avalanche metric defines it", "Avalanche",
              "step axis = the metric's own x value (training iterations for training metrics)"),
    MetricDoc("val/acc", "accuracy on the validation split carved from the experience's training data",
              "evaluation during training (eval.every_epochs / eval.every_steps)", "—",
              "step axis = training iterations; never computed on test data"),
    MetricDoc("val/loss", "mean cross-entropy on the validation split", "evaluation during training", "—",
              "step axis = training iterations"),
    MetricDoc("select/epoch", "epochs completed when the kept model was validated",
              "checkpoint.select=best|last by checkpoint.select_metric", "—"),
    MetricDoc("select/step", "training iteration of the kept model's validation", "—", "—"),
    MetricDoc("select/val_acc", "val/acc of the kept model", "—", "—"),
    MetricDoc("select/val_loss", "val/loss of the kept model", "—", "—"),
    MetricDoc("<metric>/mean", "mean over the N seed runs of a final metric (parent run of --seeds N)",
              "multi-seed aggregate", "—"),
    MetricDoc("<metric>/std", "sample standard deviation (ddof = 1) over the seed runs",
              "multi-seed aggregate", "—", "numpy's default np.std is ddof = 0"),
    MetricDoc("<metric>/ci95", "t_{0.975, N−1} · std / √N: half-width of the 95% confidence interval",
              "Student-t interval", "—", "some papers report ± std or ± standard error instead"),
    MetricDoc("sweep/<name>", "member runs of the sweep that ended FINISHED, FAILED or KILLED (<name> = "
              "finished | failed | killed); sweep/members counts every member",
              "sweep parent run, step 0, logged when the sweep is finalized", "—"),
    MetricDoc("unlearn/forget_acc", "accuracy on every training sample deleted so far",
              "forget-set accuracy (at forget steps)", "standard (e.g. Jia et al., NeurIPS 2023)",
              "an exact method matches the retrain oracle's value, which is not 0"),
    MetricDoc("unlearn/retain_acc", "accuracy on the live (learned, not deleted) training samples",
              "retain-set accuracy", "standard", "subsampled (seeded) above 5,000 samples"),
    MetricDoc("unlearn/test_acc", "accuracy on the test samples of the learned experiences",
              "sample-weighted", "standard", "acc/avg_seen weights experiences equally"),
    MetricDoc("unlearn/mia_auc", "AUC of 'lower loss ⇒ member', forget set vs held-out test samples; on QA "
              "streams the answers' mean NLL (EOS included), forget answers vs unseen answers",
              "loss-threshold (LOSS) membership inference", "Yeom et al., CSF 2018; open-unlearning mia_loss",
              "0.5 = deleted samples look unseen; compare with the retrain run's value; forget = positive "
              "class (open-unlearning's scale; MUSE's AUCs are 1 − this)"),
    MetricDoc("unlearn/mia_efficacy", "share of forget samples an SVC (retain = member, test = "
              "non-member, true-class confidence) calls non-members", "MIA-efficacy",
              "Jia et al., NeurIPS 2023", "higher = more forgotten"),
    MetricDoc("unlearn/n_forgotten", "training samples deleted so far", "—", "—"),
    MetricDoc("unlearn/serve_s", "wall seconds to serve the deletion request (model ready to predict)",
              "—", "—"),
    MetricDoc("unlearn/retrain_samples", "samples × epochs re-processed to serve the request",
              "cost in sample passes", "—", "0 for S3T unless a shard ran out of sequences"),
    MetricDoc("unlearn/requests_since_retrain", "requests served with no gradient step since the "
              "method last had to train (S3T: since the last learn, until every shard has run out "
              "of sequences)", "requests before a retrain is needed (deletion capacity)",
              "Chowdhury et al., S3T, ICLR 2025"),
    MetricDoc("unlearn/live_shards", "S3T shards with a live sequence", "—", "Chowdhury et al., S3T, ICLR 2025"),
    MetricDoc("unlearn/served_prefix", "mean over live shards of served stages / slices",
              "—", "Chowdhury et al., S3T, ICLR 2025"),
    MetricDoc("unlearn/live_seq/shard_<j>", "S3T sequences of shard j with a non-empty prefix",
              "—", "Chowdhury et al., S3T, ICLR 2025"),
    # --- LLM unlearning on TOFU-style QA streams (lethe/metrics/qa.py; at every evaluation point)
    MetricDoc("unlearn/<name>_para_prob", "mean over items of exp(−mean NLL) of the paraphrased answer",
              "TOFU probability of the paraphrased answer", "Maini et al., TOFU, 2024 (open-unlearning "
              "Q_A_PARA_Prob)"),
    MetricDoc("unlearn/<name>_pert_prob", "mean over items of the mean over perturbed answers of exp(−mean NLL)",
              "TOFU probability of the perturbed answers", "Maini et al., TOFU, 2024 (open-unlearning "
              "Q_A_PERT_Prob)"),
    MetricDoc("unlearn/<name>_prob", "mean over the split's items of exp(−mean answer-token NLL) given "
              "the question; on real_authors / world_facts p(a) / Σ p over the true and perturbed answers",
              "TOFU probability (length-normalised)", "Maini et al., TOFU, 2024",
              "<name> = forget | retain | real_authors | world_facts | unseen; EOS counted, as TOFU"),
    MetricDoc("unlearn/<name>_rouge", "mean ROUGE-L recall (LCS / reference tokens) of the greedy answer, "
              "rouge-score tokens (lower-cased alphanumeric) with the Porter stemmer",
              "ROUGE-L recall, stemmed", "Lin, 2004; as TOFU, open-unlearning (rougeL_recall) and ReLearn",
              "'book' vs 'books' scores 1 (stemmed); feeds model_utility"),
    MetricDoc("unlearn/<name>_rouge1_recall", "mean ROUGE-1 recall (shared unigrams / reference unigrams), "
              "stemmed", "ROUGE-1 recall", "Lin, 2004; open-unlearning rouge1_recall, ReLearn"),
    MetricDoc("unlearn/<name>_rougeL_f1", "mean ROUGE-L F-measure (harmonic mean of LCS precision and recall), "
              "stemmed", "ROUGE-L F1", "Lin, 2004; open-unlearning rougeL_f1"),
    MetricDoc("unlearn/<name>_truth_ratio", "R = exp(NLL_paraphrased − mean_k NLL_perturbed_k) per item, "
              "reported as mean min(R, 1/R) on forget and unseen, mean max(0, 1 − R) on retain, "
              "real_authors, world_facts", "TOFU truth ratio as reported",
              "Maini et al., TOFU, 2024 (aggregate_eval_stat.py; open-unlearning closer_to_1_better / "
              "true_better)", "higher = better on every split; the mean of R itself is <name>_truth_ratio_raw"),
    MetricDoc("unlearn/<name>_truth_ratio_raw", "mean over items of R (geometric mean over perturbed answers "
              "/ paraphrased answer)", "truth ratio, unaggregated", "Maini et al., TOFU, 2024",
              "what unlearn/<name>_truth_ratio meant before this release"),
    MetricDoc("unlearn/<name>_ma", "mean over the split's answers of the share of answer tokens, EOS "
              "included, the model's teacher-forced argmax predicts", "memorisation accuracy MA",
              "Jang et al., ACL 2023", "'done' when forget_ma ≤ unseen_ma (authors never trained on); "
              "open-unlearning's exact_memorization leaves the EOS out: <name>_ma_no_eos"),
    MetricDoc("unlearn/<name>_ma_no_eos", "as <name>_ma without each answer's last (EOS) position",
              "exact memorisation (EM)", "Tirumala et al., NeurIPS 2022; open-unlearning exact_memorization",
              "about 0.5 / T apart from <name>_ma on a T-token answer"),
    MetricDoc("unlearn/<name>_es", "mean over answers of 1 − k/T, k = first index from which the teacher-forced "
              "argmax reproduces the rest of the answer (T tokens, EOS left out; k stops at T − 1)",
              "extraction strength", "Carlini et al., USENIX Security 2021; Wang et al., ICLR 2025; "
              "open-unlearning extraction_strength",
              "as open-unlearning a wrong last token still scores 1/T (the definition gives 0)"),
    MetricDoc("unlearn/model_utility", "harmonic mean of {prob, ROUGE-L recall, mean max(0, 1 − R)} over retain, "
              "real_authors, world_facts", "TOFU model utility", "Maini et al., TOFU, 2024"),
    MetricDoc("unlearn/forget_quality", "KS-test p-value between the forget-set truth ratios of the model "
              "and of a retain-only model: scenario.retain_model_path (e.g. TOFU's published retain90 "
              "fine-tune), else one trained by the platform (same model, train settings, seed)",
              "TOFU forget quality", "Maini et al., TOFU, 2024",
              "higher = closer to never having seen the data; TOFU tests 1/R, open-unlearning R: the KS "
              "p-value is the same (rank-based)"),
    MetricDoc("unlearn/<name>_el", "mean over memorised (TDEC-style) sequences of EL_n: mean over prefixes "
              "of the n-gram overlap of the greedy continuation with the true suffix (n = scenario.el_n)",
              "extraction likelihood EL_n", "Jang et al., ACL 2023", "<name> = forget | unseen"),
    MetricDoc("unlearn/mink_auc", "AUC separating forget answers (members) from unseen answers by Min-K% prob: "
              "mean of the max(1, ⌊k·T⌋) lowest token log-probs, EOS left out, k = scenario.mink_k (0.4)",
              "Min-K% prob membership inference", "Shi et al., ICLR 2024; k and EOS as MUSE / open-unlearning "
              "mia_min_k", "forget = positive class (open-unlearning's scale; MUSE's is 1 − this)"),
    MetricDoc("unlearn/mink_auc_k20", "unlearn/mink_auc with k = 0.2", "Min-K% prob at Shi et al.'s k = 20%",
              "Shi et al., ICLR 2024"),
    MetricDoc("unlearn/minkpp_auc", "AUC of Min-K%++: mean of the max(1, ⌊k·T⌋) lowest (log p(y_t) − μ_t) / σ_t, "
              "μ_t, σ_t² = mean and variance of log p(·) under the model's next-token distribution, EOS left "
              "out, k = scenario.mink_k", "Min-K%++ membership inference",
              "Zhang et al., Min-K%++, 2024; open-unlearning mia_min_k_plus_plus", "σ² clamped at 1e-6"),
    MetricDoc("unlearn/zlib_auc", "AUC of 'lower mean answer NLL / zlib-compressed bytes of the answer text ⇒ "
              "member', forget vs unseen answers", "zlib membership inference",
              "Carlini et al., USENIX Security 2021; open-unlearning mia_zlib"),
    MetricDoc("unlearn/privleak", "(AUC'_model − AUC'_retain_only) / AUC'_retain_only · 100 with AUC' = "
              "1 − unlearn/mink_auc (MUSE's holdout-positive AUC)", "PrivLeak",
              "Shi et al., MUSE, 2024 (Min-40%); open-unlearning privleak",
              "0 = leaks as much as a model that never saw the forget set; ≈ −100 = not unlearned "
              "(AUC 1 vs 0.5); > 0 = over-unlearned"),
    MetricDoc("unlearn/kfr", "mean over forget items of 1[NLI(premise = greedy answer, hypothesis = answer) is "
              "contradiction ∨ E ≤ θ1] (θ1 = 0.3, 0.5 with ≤ 3 answer entities); E = matched (answer entity, "
              "greedy-answer entity) pairs with cosine ≥ 0.8 / answer entities, entities sharing a word "
              "with the question dropped, E = 0 when either side has none",
              "knowledge forgetting rate", "Xu et al., ReLearn, 2025 (evals/evaluate.py)",
              "offline defaults: MiniLM embedder, rule-based entities and NLI judge (scenario.embedder / judge); "
              "E can exceed 1, as ReLearn's pair count"),
    MetricDoc("unlearn/krr", "mean over retain items of 1[NLI(premise = answer, hypothesis = greedy answer) is "
              "not contradiction ∧ E ≥ 0.3]", "knowledge retention rate", "Xu et al., ReLearn, 2025",
              "same E and pluggable judges as kfr"),
    MetricDoc("unlearn/<name>_ls", "harmonic mean of 1/(1+PPL), 1/(1+W), H/(1+H) of the means over the "
              "split's greedy answers of PPL, W = N^(V^−0.165), H = 100 ln N / (1 − V1/V + 0.1), over nltk "
              "word tokens of the lower-cased answer (punctuation kept, \"'s\" split)",
              "Linguistic Score", "Xu et al., ReLearn, 2025",
              "PPL from the evaluated model by default (scenario.ppl_model: self | reference | wordfreq, "
              "a unigram model of English word frequencies | a local causal LM folder — ReLearn's "
              "code uses an external fluent LLM judge); an empty answer counts W = 1000, H = 0, as in the reference code"),
    MetricDoc("unlearn/unlearn_steps", "optimizer steps spent serving the deletion request", "—", "—"),
    MetricDoc("unlearn/target_reached", "1 when the method stopped because forget MA ≤ unseen MA "
              "(method.stop_at_target), 0 at the epoch cap", "—", "Jang et al., ACL 2023"),
    MetricDoc("mos/stored_adapter_bytes", "bytes of the adapter copies MOS stores (one per task)",
              "storage cost", "Sun et al., MOS, AAAI 2025"),
    MetricDoc("mos/class_statistics_bytes", "bytes of the per-class Gaussian statistics (means, covariances)",
              "storage cost", "Sun et al., MOS, AAAI 2025"),
    MetricDoc("time/train_s", "wall seconds serving the experience (train / unlearn / update)", "—", "—"),
    MetricDoc("time/eval_s", "wall seconds of the batched evaluation after the experience", "—", "—"),
)


# Keys whose meaning changed, newest release first: (release, key, what changed).
CHANGELOG: tuple[tuple[str, str, str], ...] = (
    ("issue 19", "unlearn/*", "scenario.prompt_format (default auto): with a tokenizer that has a chat "
     "template, every QA row (fine-tuning, evaluation, ReLearn's augmented rows) is that template's turn "
     "(e.g. Llama-2-chat's `<s>[INST] q [/INST] a </s>`), so every unlearn/* value of such a run changes; "
     "prompts were the plain `Question: q\\nAnswer: a` format before (prompt_format: plain keeps it; auto "
     "picks it for tokenizers without a template, such as lethe's word tokenizer)"),
    ("issue 19", "unlearn/privleak", "MUSE's / open-unlearning's sign and denominator: computed on the "
     "holdout-positive AUC 1 − mink_auc, so a model that has not unlearned reads ≈ −100 (was "
     "(AUC_u − AUC_r) / AUC_r on the forget-positive AUC: +100 there)"),
    ("issue 19", "unlearn/<name>_truth_ratio", "TOFU's reported aggregate: mean min(R, 1/R) on forget / unseen, "
     "mean max(0, 1 − R) elsewhere (was the mean of R, now <name>_truth_ratio_raw)"),
    ("issue 19", "unlearn/<name>_rouge", "rouge-score's ROUGE-L recall with the Porter stemmer (was "
     "unstemmed LCS over [a-z0-9]+ words); changes unlearn/model_utility too"),
    ("issue 19", "unlearn/mink_auc", "max(1, ⌊k·T⌋) lowest log-probs, EOS left out, default k = 0.4 (was "
     "⌈k·T⌉, EOS counted, k = 0.2; k = 0.2 is now unlearn/mink_auc_k20); changes unlearn/privleak too"),
    ("issue 19", "unlearn/kfr, unlearn/krr", "ReLearn's rules: no entities → E = 0 (was 1), matched pairs "
     "counted (E may exceed 1), exact fractions (3/10 = 0.3 meets θ = 0.3), the prediction is the NLI "
     "premise on forget, entities sharing a word with the question dropped"),
    ("issue 19", "unlearn/<name>_ls", "ReLearn's tokens: nltk word_tokenize of the lower-cased answer, "
     "punctuation kept, \"'s\" split (was [a-z0-9']+ words)"),
    ("issue 19", "unlearn/mia_auc", "also logged on QA streams (answer-NLL LOSS attack, forget vs unseen)"),
    ("issue 20", "unlearn/retrain_samples", "SISA trains the official per-slice epochs "
     "int((s+1)·a) − int(s·a), a = 2·train.epochs/(slices+1), instead of train.epochs at every "
     "stage: SISA's value is smaller (about 2/(slices+1) of before)"),
    ("issue 20", "unlearn/requests_since_retrain", "S3T counts until every shard has run out of "
     "sequences since the last learn (the paper's deletion capacity); it was reset by any shard "
     "retrain"),
)


def pattern(key: str) -> re.Pattern:
    rx = re.escape(key)
    for placeholder, sub in (("<j>", r"\d+"), ("<k>", r"\d+"), ("<i>", r"\d+"), ("<name>", r"[\w.-]+"),
                                    ("<metric>", r"[\w./-]+")):
        rx = rx.replace(re.escape(placeholder), sub)
    return re.compile(rx + r"\Z")


def lookup(key: str) -> MetricDoc | None:
    for doc in METRICS:
        if pattern(doc.key).match(key):
            return doc
    return None


def undocumented(keys) -> list[str]:
    return sorted(k for k in set(keys) if lookup(k) is None)


def as_text() -> str:
    lines = []
    for d in METRICS:
        lines.append(f"{d.key}\n    formula: {d.formula}\n    variant: {d.variant}\n    source:  {d.source}")
        if d.differs:
            lines.append(f"    differs: {d.differs}")
    return "\n".join(lines)


def as_markdown() -> str:
    out = ["# lethe metrics reference", "",
           "Generated from `lethe/metrics/reference.py` (`lethe list metrics` prints the same).",
           "MLflow step = index of the experience just finished, except `train/*` (iteration axis).",
           f"Notation: {R}.", "",
           "| key | formula | variant | defined by | differs from other tools |",
           "|---|---|---|---|---|"]
    for d in METRICS:
        cells = [f"`{d.key}`", d.formula, d.variant, d.source, d.differs or ""]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out += ["", "## Changelog", "", "Keys whose meaning changed (the value of an older run is not comparable "
            "with a newer one under the same key).", "", "| release | key | change |", "|---|---|---|"]
    for release, key, change in CHANGELOG:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in (release, f"`{key}`", change)) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(as_markdown(), end="")
