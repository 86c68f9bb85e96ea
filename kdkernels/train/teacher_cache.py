"""The offline teacher cache: a trained teacher's top-k log-probabilities and the mass of every
other token (the tail) for every training token, written once, then memory-mapped and read in
slices by the students, with no teacher forward.

A cache is a folder of numpy .npy files, each memory-mappable: indices.npy [tokens, k] (uint16
when the vocabulary fits, else int32), values.npy [tokens, k] float32 log-probabilities (at T=1,
largest first), tail.npy [tokens] float32 (1 - the top-k's probability, computed in float64), and
meta.json (format, k, vocab, dtypes, token count, the teacher checkpoint's hash, write time).
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch

FORMAT = 1
ROWS_AT_ONCE = 4096  # rows of float64 probabilities at a time: 1 GiB at a 32768 vocabulary


def file_hash(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def top_k(logits, k):
    """(indices, log-probabilities, tail mass) of each row's k most likely tokens, from [rows, V]
    logits: the log-probabilities in float32, the tail from the float64 probabilities."""
    log_p = torch.log_softmax(logits.double(), -1)
    values, indices = log_p.topk(k, -1)
    tail = (1 - values.exp().sum(-1)).clamp(min=0)
    return indices, values.float(), tail.float()


def write(folder, logit_batches, tokens, k, vocab_size, teacher_hash):
    """Writes the cache of `tokens` rows from `logit_batches` (an iterable of [rows, vocab_size]
    teacher logits, in token order) into `folder` (through a temporary folder, renamed at the
    end: a crash leaves no half cache). Returns its metadata."""
    started = time.perf_counter()
    index_dtype = np.uint16 if vocab_size <= 2 ** 16 else np.int32
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    arrays = {
        "indices": np.lib.format.open_memmap(os.path.join(tmp, "indices.npy"), "w+",
                                             index_dtype, (tokens, k)),
        "values": np.lib.format.open_memmap(os.path.join(tmp, "values.npy"), "w+", np.float32,
                                            (tokens, k)),
        "tail": np.lib.format.open_memmap(os.path.join(tmp, "tail.npy"), "w+", np.float32,
                                          (tokens,)),
    }
    done = 0
    for logits in logit_batches:
        if logits.shape[-1] != vocab_size:
            raise ValueError(f"teacher logits have {logits.shape[-1]} columns, the cache "
                             f"{vocab_size}")
        for part in logits.reshape(-1, vocab_size).split(ROWS_AT_ONCE):
            indices, values, tail = top_k(part, k)
            rows = slice(done, done + len(tail))
            arrays["indices"][rows] = indices.cpu().numpy().astype(index_dtype)
            arrays["values"][rows] = values.cpu().numpy()
            arrays["tail"][rows] = tail.cpu().numpy()
            done += len(tail)
    if done != tokens:
        raise ValueError(f"the teacher gave {done} rows, the cache expects {tokens}")
    for array in arrays.values():
        array.flush()
    del arrays
    meta = dict(format=FORMAT, k=k, vocab_size=vocab_size, tokens=tokens,
                index_dtype=np.dtype(index_dtype).name, value_dtype="float32",
                tail_dtype="float32", teacher=teacher_hash,
                write_seconds=time.perf_counter() - started)
    with open(os.path.join(tmp, "meta.json"), "w") as handle:
        json.dump(meta, handle, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return meta


class TeacherCache:
    """A written cache, memory-mapped: `rows(positions)` reads the rows of some token positions;
    `read_seconds` adds up the time spent reading."""

    def __init__(self, folder):
        with open(os.path.join(folder, "meta.json")) as handle:
            self.meta = json.load(handle)
        self.indices, self.values, self.tail = (
            np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
            for name in ("indices", "values", "tail"))
        self.read_seconds, self.rows_read = 0.0, 0

    @staticmethod
    def valid(folder, k, vocab_size, tokens, teacher_hash):
        """True when `folder` holds a complete cache of this teacher with these sizes."""
        try:
            with open(os.path.join(folder, "meta.json")) as handle:
                meta = json.load(handle)
        except (OSError, ValueError):
            return False
        return (meta.get("format"), meta.get("k"), meta.get("vocab_size"), meta.get("tokens"),
                meta.get("teacher")) == (FORMAT, k, vocab_size, tokens, teacher_hash)

    def bytes_per_token(self):
        return sum(a.dtype.itemsize * (a.shape[1] if a.ndim == 2 else 1)
                   for a in (self.indices, self.values, self.tail))

    def rows(self, positions, k=None):
        """(indices int64, values float32, tail float32) tensors of the token `positions` (an
        integer array of any shape; the results have its shape + (k,), k <= the cache's)."""
        started = time.perf_counter()
        positions = np.asarray(positions)
        flat = positions.reshape(-1)
        k = self.meta["k"] if k is None else k
        indices = torch.from_numpy(self.indices[flat, :k].astype(np.int64))
        values = torch.from_numpy(np.ascontiguousarray(self.values[flat, :k]))
        tail = torch.from_numpy(np.ascontiguousarray(self.tail[flat]))
        self.read_seconds += time.perf_counter() - started
        self.rows_read += len(flat)
        shape = positions.shape
        return indices.view(*shape, k), values.view(*shape, k), tail.view(shape)
