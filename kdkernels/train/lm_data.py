"""The language-model task's data, offline: the running Python's standard-library sources, split by
file into train and validation, a byte-level BPE tokenizer trained on the train split (the
`tokenizers` library) and the token ids, both cached on disk under a key of what determines them.
"""
import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

# folders that hold tests, tools or third-party code rather than the library's own source
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                 "turtledemo", "__pycache__"}
VALIDATION_PERCENT = 5
END_OF_FILE = "<|endoftext|>"  # between two files: the one special token


@dataclass
class LMData:
    """Token ids of the two splits (int64 tensors) and what produced them."""
    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int  # the tokenizer's, which every student's lm_head has
    python: str
    files: dict  # split name -> number of files
    cache: str  # the folder holding tokenizer.json and the ids


def stdlib_root():
    return sysconfig.get_paths()["stdlib"]


def file_hash(relative_path):
    return hashlib.sha256(relative_path.encode()).hexdigest()


def split_files(root=None):
    """{"train": [...], "val": [...]}: the relative paths ('/'-separated) of the library's .py
    files, outside EXCLUDED_DIRS and the machine-specific _sysconfigdata*. A file is validation
    when its path's hash falls in VALIDATION_PERCENT of 100 buckets, so the split is the same on
    every machine with the same Python version; each side is in hash order (a prefix of it is a
    sample of files, not the first letters of the alphabet)."""
    root = stdlib_root() if root is None else root
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                paths.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    paths.sort(key=file_hash)
    val = [p for p in paths if int(file_hash(p)[:8], 16) % 100 < VALIDATION_PERCENT]
    taken = set(val)
    return {"train": [p for p in paths if p not in taken], "val": val}


def read_source(root, relative_path):
    with open(os.path.join(root, relative_path), encoding="utf-8", errors="replace") as handle:
        return handle.read()


def cache_key(split, vocab_size):
    """What determines the tokenizer and the ids: Python version, the split, the vocabulary size
    and the tokenizers version."""
    import tokenizers
    what = {"python": platform.python_version(), "split": split, "vocab_size": vocab_size,
            "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdkernels", "lm")


def train_tokenizer(root, files, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_FILE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator((read_source(root, f) for f in files), trainer=trainer)
    return tokenizer


def encode(tokenizer, root, files):
    """The files' ids, each file followed by END_OF_FILE, as one array."""
    end = tokenizer.token_to_id(END_OF_FILE)
    texts = [read_source(root, f) for f in files]
    ids = [np.append(np.asarray(e.ids, dtype=np.int64), end)
           for e in tokenizer.encode_batch(texts)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def _save_atomically(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path, array, dtype):
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to the temporary name
        np.save(handle, array.astype(dtype))


def load(vocab_size=8192, cache_dir=None, root=None):
    """The split, tokenizer and ids, from the cache when there (nothing is retrained), else built
    and cached."""
    from tokenizers import Tokenizer
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be >= 257 (the 256 bytes and {END_OF_FILE}), got "
                         f"{vocab_size}")
    root = stdlib_root() if root is None else root
    split = split_files(root)
    if not split["train"] or not split["val"]:
        raise RuntimeError(f"no standard-library sources for both splits under {root}")
    folder = os.path.join(cache_dir or default_cache_dir(), cache_key(split, vocab_size))
    paths = {name: os.path.join(folder, name) for name in
             ("tokenizer.json", "train.npy", "val.npy")}
    if all(os.path.isfile(p) for p in paths.values()):
        tokenizer = Tokenizer.from_file(paths["tokenizer.json"])
        ids = {name: np.load(paths[f"{name}.npy"]) for name in ("train", "val")}
    else:
        os.makedirs(folder, exist_ok=True)
        tokenizer = train_tokenizer(root, split["train"], vocab_size)
        ids = {name: encode(tokenizer, root, split[name]) for name in ("train", "val")}
        small = np.uint16 if tokenizer.get_vocab_size() <= 2 ** 16 else np.int32
        for name in ("train", "val"):
            _save_atomically(paths[f"{name}.npy"],
                             lambda tmp, n=name: _save_npy(tmp, ids[n], small))
        _save_atomically(paths["tokenizer.json"], tokenizer.save)
    return LMData(train=torch.from_numpy(ids["train"].astype(np.int64)),
                  val=torch.from_numpy(ids["val"].astype(np.int64)),
                  vocab_size=tokenizer.get_vocab_size(), python=platform.python_version(),
                  files={name: len(split[name]) for name in split}, cache=folder)
