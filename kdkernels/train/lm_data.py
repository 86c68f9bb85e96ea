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

# Folders that hold tests, tools or third-party code rather than the library's own source, or
# whose presence depends on the machine: Debian and Ubuntu ship distutils, ensurepip, tkinter,
# lib2to3, idlelib and test as separate packages and drop ctypes/macholib (macOS); lib-dynload
# holds built extensions; msilib is installed on Windows only. Also every "config-*" folder
# (config-3.11-x86_64-linux-gnu: the platform triplet and build files).
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3",
                 "turtledemo", "__pycache__", "distutils", "ensurepip", "tkinter", "macholib",
                 "lib-dynload", "msilib"}
# site configuration, and a file Debian adds, rather than library source
EXCLUDED_FILES = {"sitecustomize.py", "usercustomize.py", "_distutils_system_mod.py"}
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
    digest: str  # of the file list (files_digest): equal on two machines, the same split
    cache: str  # the folder holding tokenizer.json and the ids


def stdlib_root():
    return sysconfig.get_paths()["stdlib"]


def file_hash(relative_path):
    return hashlib.sha256(relative_path.encode()).hexdigest()


def split_files(root=None):
    """{"train": [...], "val": [...]}: the relative paths ('/'-separated) of the library's .py
    files, outside EXCLUDED_DIRS and config-*, except EXCLUDED_FILES and the machine-specific
    _sysconfigdata*. A file is validation when its path's hash falls in VALIDATION_PERCENT of 100
    buckets, so the split is the same on every machine with the same Python version; each side
    is in hash order (a prefix of it is a sample of files, not the first letters of the
    alphabet)."""
    root = stdlib_root() if root is None else root
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-"))
        for name in files:
            if name.endswith(".py") and name not in EXCLUDED_FILES \
                    and not name.startswith("_sysconfigdata"):
                paths.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    paths.sort(key=file_hash)
    val = [p for p in paths if int(file_hash(p)[:8], 16) % 100 < VALIDATION_PERCENT]
    taken = set(val)
    return {"train": [p for p in paths if p not in taken], "val": val}


def files_digest(split):
    """12 hex digits of the SHA-256 of the split's sorted file list: two machines that print the
    same digest train and validate on the same files."""
    listing = "\n".join(sorted(split["train"] + split["val"]))
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def tokenizers_module():
    """The `tokenizers` package, or a RuntimeError saying how to install it (an extra)."""
    try:
        import tokenizers
    except ImportError as error:
        raise RuntimeError(f"--task lm needs the tokenizers package: pip install "
                           f"'kdkernels[train]' (or tokenizers): {error}") from error
    return tokenizers


def read_source(root, relative_path):
    with open(os.path.join(root, relative_path), encoding="utf-8", errors="replace") as handle:
        return handle.read()


def cache_key(split, vocab_size):
    """What determines the tokenizer and the ids: Python version, the split, the vocabulary size
    and the tokenizers version."""
    what = {"python": platform.python_version(), "split": split, "vocab_size": vocab_size,
            "tokenizers": tokenizers_module().__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdkernels", "lm")


def train_tokenizer(root, files, vocab_size):
    tok = tokenizers_module()
    models, pre_tokenizers = tok.models, tok.pre_tokenizers
    tokenizer = tok.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tok.decoders.ByteLevel()
    trainer = tok.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_FILE],
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
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be >= 257 (the 256 bytes and {END_OF_FILE}), got "
                         f"{vocab_size}")
    Tokenizer = tokenizers_module().Tokenizer
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
                  files={name: len(split[name]) for name in split},
                  digest=files_digest(split), cache=folder)


def load_shared(vocab_size=8192, cache_dir=None, root=None):
    """load() under torchrun: rank 0 builds the cache entry (trains the tokenizer, encodes the
    splits) while the others wait, then they read it, rather than every process training the
    same tokenizer at once. An error on rank 0 is raised on every rank, not left as a hang."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load(vocab_size, cache_dir, root)
    data, problem = None, None
    if dist.get_rank() == 0:
        try:
            data = load(vocab_size, cache_dir, root)
        except Exception as error:  # noqa: BLE001 -- re-raised below, after the others know
            problem = error
    outcome = [None if problem is None else f"{type(problem).__name__}: {problem}"]
    dist.broadcast_object_list(outcome, src=0)  # the barrier: rank 0 is done
    if problem is not None:
        raise problem
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 could not build the language-model data: {outcome[0]}")
    return data if data is not None else load(vocab_size, cache_dir, root)
