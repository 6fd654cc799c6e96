"""Class-incremental text classification from local files, tokenised once into tensors.

Sources (``scenario.path``): a CSV or JSONL file, or a Hugging Face dataset saved with
``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` whose ``test`` split is used as the
test set), with a text column and a label column (ints or strings; strings are numbered in
sorted order). ``path: ""`` uses a generated topic dataset (English sentences built from
per-topic word lists, seeded) so presets and tests run offline with no files.

Samples are tokenised with a local Hugging Face tokenizer (default: the packaged
all-MiniLM-L6-v2's) into int64 ``[N, 2, max_length]`` tensors (ids, attention mask), which
the ``hf_encoder`` model reads. Classes are split into experiences in a seeded order;
sample ids are row numbers (train rows first, then test rows), stable across runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lethe.errors import ConfigError
from lethe.registry import register_scenario


@dataclass
class TextClassificationConfig:
    path: str = ""                # CSV / JSONL file or HF dataset folder; "" = generated topics
    test_path: str = ""           # optional separate test file/folder; else a stratified split
    text_column: str = "text"
    label_column: str = "label"
    n_experiences: int = 5        # classes split evenly (leftovers to the first experiences)
    task_labels: bool = False     # True: experience i has task label i (task-incremental)
    shuffle_classes: bool = True  # seeded class order
    class_seed: int = 0           # seed of the class order, the split and the generated data
    test_fraction: float = 0.25   # used when the source has no test split
    tokenizer: str = "minilm"     # local HF tokenizer folder; "minilm" = packaged all-MiniLM-L6-v2
    max_length: int = 32          # tokens per sample (padded / truncated)
    max_per_class: int = 0        # > 0: keep at most this many training samples per class
    generated_classes: int = 10   # generated topics (path "")
    generated_per_class: int = 60  # generated sentences per topic (path "")
    forget_requests: list = field(default_factory=list)  # deletion requests (scenarios/forget.py)


# --- the generated topic dataset ----------------------------------------------------------
TOPICS = {
    "sports": "football goal referee stadium striker tournament coach league match team score penalty",
    "cooking": "recipe oven garlic flour simmer kitchen pasta sauce onion bake chef spice",
    "weather": "rain storm forecast cloud thunder humid snow wind temperature sunny fog drizzle",
    "music": "guitar melody concert drummer album chorus violin orchestra song piano lyrics rhythm",
    "finance": "stock market investor bank loan interest dividend budget inflation profit tax bond",
    "medicine": "doctor patient vaccine surgery hospital nurse symptom diagnosis fever clinic dose therapy",
    "space": "planet rocket orbit astronaut galaxy telescope moon comet satellite nebula launch star",
    "gardening": "tomato seed soil compost garden shovel bloom weed fertilizer tulip hedge harvest",
    "computing": "software laptop compiler keyboard server database python code bug network chip pixel",
    "travel": "airport passport luggage hotel ticket journey tourist beach flight museum map train",
    "law": "judge court lawyer verdict trial jury contract lawsuit witness appeal statute evidence",
    "animals": "tiger elephant puppy zoo feather whale kitten wolf rabbit parrot horse dolphin",
}
TEMPLATES = (
    "the {a} and the {b} were all anyone talked about",
    "yesterday i read a long story about a {a} and a {b}",
    "my friend cannot stop thinking about the {a}",
    "there was news today about the {a} near the {b}",
    "nobody expected the {a} to matter so much for the {b}",
    "she wrote a short note about the {a}, the {b} and the {c}",
    "we spent the whole evening discussing the {a}",
    "is the {a} really more important than the {b}",
)


def generated_topics(n_classes: int, per_class: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """Seeded sentences about ``n_classes`` topics: (texts, labels, topic names)."""
    import numpy as np

    names = list(TOPICS)
    if not 2 <= n_classes <= len(names):
        raise ConfigError(f"scenario.generated_classes={n_classes} must be between 2 and {len(names)}")
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for c, name in enumerate(names[:n_classes]):
        words = TOPICS[name].split()
        for _ in range(per_class):
            a, b, cw = rng.choice(words, 3, replace=False)
            if rng.random() < 0.15:   # some off-topic words, so the task is not a word lookup
                b = rng.choice(TOPICS[names[int(rng.integers(n_classes))]].split())
            texts.append(TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(a=a, b=b, c=cw))
            labels.append(c)
    return texts, labels, names[:n_classes]


# --- reading local sources ----------------------------------------------------------------
def _read_rows(path: str, key: str) -> list[dict] | dict[str, list[dict]]:
    """Rows of a CSV / JSONL file, or the splits of a HF dataset folder ({split: rows})."""
    import csv
    import json
    import os

    path = os.path.expanduser(path)
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f))
                   for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            raise ConfigError(f"{key}: '{path}' is a folder but not a Hugging Face dataset saved "
                              f"with save_to_disk (no dataset_dict.json / state.json)")
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(path)
        if isinstance(ds, DatasetDict):
            return {name: [dict(r) for r in split] for name, split in ds.items()}
        return [dict(r) for r in ds]
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: file or folder not found: '{path}'")
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{key}: {path}, line {n}: not JSON ({exc.msg})") from None
        return rows
    if path.endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if path.endswith(".tsv") else ","))
    raise ConfigError(f"{key}: '{path}' must be a .csv, .tsv, .jsonl file or a dataset folder")


def _columns(rows: list[dict], cfg, key: str) -> tuple[list[str], list]:
    if not rows:
        raise ConfigError(f"{key}: no rows")
    for col, name in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        if col not in rows[0]:
            raise ConfigError(f"scenario.{name}: column '{col}' not in {key} (columns: "
                              f"{', '.join(map(str, rows[0]))})")
    return [str(r[cfg.text_column]) for r in rows], [r[cfg.label_column] for r in rows]


def _label_ids(train_labels: list, test_labels: list) -> tuple[list[int], list[int], list[str]]:
    """Labels → 0..K-1: integers keep their numeric order, strings are sorted."""
    def norm(v):
        s = str(v).strip()
        try:
            return (0, int(s), s)
        except ValueError:
            return (1, 0, s)

    keys = sorted({norm(v) for v in list(train_labels) + list(test_labels)})
    index = {k: i for i, k in enumerate(keys)}
    return ([index[norm(v)] for v in train_labels], [index[norm(v)] for v in test_labels],
            [k[2] for k in keys])


def tokenize(texts: list[str], tokenizer_path: str, max_length: int):
    """int64 [N, 2, max_length]: token ids and attention mask."""
    import torch

    from lethe.models.hf import load_tokenizer, resolve_pretrained

    tok = load_tokenizer(resolve_pretrained(tokenizer_path, "scenario.tokenizer"))
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=int(max_length),
              return_tensors="pt")
    return torch.stack([enc["input_ids"].long(), enc["attention_mask"].long()], dim=1)


@register_scenario("text_classification", config=TextClassificationConfig,
                   settings=("class_incremental", "task_incremental"))
def text_classification(cfg, seed: int):
    """Class-incremental text classification from CSV/JSONL/HF-dataset files (or generated topics)."""
    import numpy as np
    import torch

    from lethe.scenarios.streams import (
        class_incremental_stream,
        seeded_class_order,
        split_classes,
        stratified_split,
    )

    if cfg.max_length < 2:
        raise ConfigError("scenario.max_length must be ≥ 2")
    test_texts = test_labels = None
    if not cfg.path:
        texts, labels, _ = generated_topics(cfg.generated_classes, cfg.generated_per_class, cfg.class_seed)
    else:
        rows = _read_rows(cfg.path, "scenario.path")
        if isinstance(rows, dict):   # DatasetDict: train (+ test) splits
            if "train" not in rows:
                raise ConfigError(f"scenario.path: the dataset's splits are {', '.join(rows)}; a "
                                  f"'train' split is needed")
            if "test" in rows and not cfg.test_path:
                test_texts, test_labels = _columns(rows["test"], cfg, "scenario.path[test]")
            rows = rows["train"]
        texts, labels = _columns(rows, cfg, "scenario.path")
    if cfg.test_path:
        trows = _read_rows(cfg.test_path, "scenario.test_path")
        if isinstance(trows, dict):
            trows = trows.get("test") or next(iter(trows.values()))
        test_texts, test_labels = _columns(trows, cfg, "scenario.test_path")
    y_train, y_test, names = _label_ids(labels, test_labels or [])
    y_train = np.asarray(y_train)
    n_classes = len(names)
    if n_classes < 2:
        raise ConfigError(f"scenario: the data has {n_classes} class; class-incremental streams need ≥ 2")
    if test_texts is None:   # one pool, split per class
        counts = np.bincount(y_train, minlength=n_classes)
        if counts.min() < 2:
            raise ConfigError(f"scenario: class '{names[int(counts.argmin())]}' has "
                              f"{int(counts.min())} sample; every class needs ≥ 2 for a train/test split")
        tr, te = stratified_split(y_train, cfg.test_fraction, cfg.class_seed)
        all_texts, all_y = list(texts), y_train
    else:
        all_texts = list(texts) + list(test_texts)
        all_y = np.concatenate([y_train, np.asarray(y_test, dtype=np.int64)])
        tr, te = np.arange(len(texts)), np.arange(len(texts), len(all_texts))
    tr = np.sort(tr)
    if cfg.max_per_class > 0:   # a seeded subset per class (quick runs)
        rng = np.random.default_rng(cfg.class_seed)
        keep = [rng.permutation(tr[all_y[tr] == c])[:cfg.max_per_class] for c in range(n_classes)]
        tr = np.sort(np.concatenate(keep))
    x = tokenize(all_texts, cfg.tokenizer, cfg.max_length)
    y = torch.as_tensor(all_y, dtype=torch.long)
    ids = torch.arange(len(all_texts))
    tr, te = torch.as_tensor(tr), torch.as_tensor(np.sort(te))
    order = seeded_class_order(n_classes, cfg.class_seed, cfg.shuffle_classes)
    stream = class_incremental_stream(
        (x[tr], y[tr], ids[tr]), (x[te], y[te], ids[te]), split_classes(order, cfg.n_experiences),
        task_labels=cfg.task_labels, input_shape=(2, int(cfg.max_length)), n_classes=n_classes)
    stream.class_names = names
    return stream
