"""
Datasets on disk and deterministic batches from them. A dataset is a dir (data/<task>/<name>/) holding
  meta.json           kind ("stream" | "examples"), tokenizer spec, vocab_size, dtype, per split: tokens, examples,
                      max_token; plus what its prepare script adds (task settings, prepare_cmd)
  {split}.bin         all token ids of the split, uint16 when the vocab fits, else uint32
  {split}.idx.bin     examples kind: int64 offsets of the examples into {split}.bin (n_examples + 1 of them)
  {split}.mask.bin    optional, examples kind: uint8 per token, 1 where the token is a loss target
Stream datasets (pretraining text) are sampled as random windows; examples datasets (memory pairs, instructions)
as whole examples, padded to block_size.
Writer: write_dataset(), used by data/<name>/prepare.py. Reader: Dataset(path), used by train.py and eval.py.
  ds = Dataset("data/memory/byte_n32_s1337"); ds.check(vocab_size, block_size, tokenizer_spec)
  x, y = ds.get_batch("train", batch_size, block_size, seed, iter_num, micro_step, grad_accum, rank, world)
  for x, y in ds.eval_batches("val", batch_size, block_size, max_batches): ...
Batches are a pure function of their arguments, so a resumed run sees exactly the batches it would have seen.
"""
import contextlib
import hashlib
import json
import os
import re
import warnings

import numpy as np
import torch

IGNORE = -100  # target id that the loss skips (prompt tokens, padding)
CHUNK = 1 << 20  # tokens buffered per write


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


def short_name(tokenizer_spec: str) -> str:
    """For dataset dir names: 'byte' -> byte, 'tiktoken:gpt2' -> gpt2, 'data/smollm2/SmolLM2-135M-Instruct' -> smollm2."""
    name = os.path.basename(os.path.normpath(tokenizer_spec)).split(":")[-1].split("-")[0].lower()
    return re.sub(r"[^a-z0-9_.]", "_", name) or "tok"


def replace_atomically(tmp, path):  # fsync, then rename: a crash leaves the old file or the new one, whole
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flush(f, bufs, dtype):
    if bufs:
        f.write(np.concatenate(bufs).astype(dtype).tobytes())
        bufs.clear()


def _write_split(out_dir, split, seqs, masks, kind, vocab_size):
    """Stream one split to {split}.bin (+ .idx.bin, .mask.bin) via temp files; returns its meta entry."""
    dtype, base = dtype_for(vocab_size), os.path.join(out_dir, split)
    lengths, max_token, buffered, bufs, mbufs = [], -1, 0, [], []
    masks = None if masks is None else iter(masks)
    with open(base + ".bin.tmp", "wb") as f, \
            (open(base + ".mask.bin.tmp", "wb") if masks is not None else contextlib.nullcontext()) as fm:
        for seq in seqs:
            a = np.asarray(seq, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= vocab_size):
                bad = a.min() if a.min() < 0 else a.max()
                raise ValueError(f"{split}: token id {bad} outside [0, vocab_size={vocab_size})")
            if masks is not None:
                m = next(masks, None)
                if m is None or len(m) != a.size:
                    raise ValueError(f"{split}: example {len(lengths)} has {a.size} tokens but its mask has "
                                     f"{'none' if m is None else len(m)}")
                mbufs.append(np.asarray(m, dtype=np.uint8))
            bufs.append(a)
            lengths.append(a.size)
            max_token = max(max_token, int(a.max(initial=-1)))
            buffered += a.size
            if buffered >= CHUNK:  # bounded memory for big streams
                _flush(f, bufs, dtype)
                _flush(fm, mbufs, np.uint8)
                buffered = 0
        _flush(f, bufs, dtype)
        _flush(fm, mbufs, np.uint8)
    replace_atomically(base + ".bin.tmp", base + ".bin")
    if masks is not None:
        replace_atomically(base + ".mask.bin.tmp", base + ".mask.bin")
    if kind == "examples":
        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64).tofile(base + ".idx.bin.tmp")
        replace_atomically(base + ".idx.bin.tmp", base + ".idx.bin")
    return {"tokens": int(sum(lengths)), "examples": len(lengths) if kind == "examples" else None,
            "max_token": max_token}


def write_dataset(out_dir, splits: dict, meta: dict, masks: dict | None = None, kind: str = "stream") -> dict:
    """Write a dataset dir. splits: {split: iterable of token-id sequences} (stream kind concatenates them, so
    they must already carry BOS/EOS); masks: {split: iterable of 0/1 sequences, one per example}, examples kind only.
    meta must hold "tokenizer" and "vocab_size"; any other keys (task info, prepare_cmd) are kept.
    meta.json is removed first and written last, so an interrupted prepare never leaves a dataset that looks complete."""
    assert kind in ("stream", "examples"), kind
    assert masks is None or kind == "examples", "loss masks need kind='examples'"
    assert "tokenizer" in meta and "vocab_size" in meta, "meta needs 'tokenizer' and 'vocab_size'"
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in splits:  # e.g. a mask file from a previous write that this one would not overwrite
        for suffix in (".bin", ".idx.bin", ".mask.bin"):
            if os.path.exists(os.path.join(out_dir, split + suffix)):
                os.remove(os.path.join(out_dir, split + suffix))
    vocab_size = int(meta["vocab_size"])
    info = {split: _write_split(out_dir, split, seqs, (masks or {}).get(split), kind, vocab_size)
            for split, seqs in splits.items()}
    meta = {"kind": kind, "tokenizer": meta["tokenizer"], "vocab_size": vocab_size,
            "dtype": np.dtype(dtype_for(vocab_size)).name, "splits": info,
            **{k: v for k, v in meta.items() if k not in ("kind", "tokenizer", "vocab_size", "dtype", "splits")}}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    replace_atomically(meta_path + ".tmp", meta_path)
    return meta


def _generator(*key) -> torch.Generator:
    """A torch.Generator seeded from a stable hash of key (python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _prepare_hint(path):
    script = os.path.join(*os.path.normpath(path).split(os.sep)[:2], "prepare.py")
    return f"; run `python {script}` first" if os.path.isfile(script) else ""


class Dataset:
    """A prepared dataset dir, memory-mapped. kind "stream": one long token stream per split, random windows.
    kind "examples": one sequence per example (+ optional loss mask), right-padded to block_size."""

    def __init__(self, path: str):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"dataset dir {path!r} not found{_prepare_hint(path)}")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found (prepare missing or interrupted){_prepare_hint(path)}")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.kind, self.vocab_size, self.tokenizer = self.meta["kind"], self.meta["vocab_size"], self.meta["tokenizer"]
        hint = (f"; run `{self.meta['prepare_cmd']}`" if "prepare_cmd" in self.meta else _prepare_hint(path))
        dtype = np.dtype(self.meta["dtype"])
        self.data, self.idx, self.mask = {}, {}, {}
        for split, info in self.meta["splits"].items():
            base = os.path.join(path, split)
            if not os.path.isfile(base + ".bin"):
                raise FileNotFoundError(f"{base}.bin not found{hint}")
            if info["tokens"] == 0 or info.get("examples") == 0:
                raise ValueError(f"split {split!r} of {path} is empty")
            if os.path.getsize(base + ".bin") != info["tokens"] * dtype.itemsize:
                raise ValueError(f"{base}.bin has {os.path.getsize(base + '.bin')} bytes, meta.json says "
                                 f"{info['tokens']} tokens of {dtype.name}: a stale or partial write{hint}")
            self.data[split] = np.memmap(base + ".bin", dtype=dtype, mode="r")
            if self.kind == "examples":
                self.idx[split] = np.fromfile(base + ".idx.bin", dtype=np.int64)
                if len(self.idx[split]) != info["examples"] + 1 or self.idx[split][-1] != info["tokens"]:
                    raise ValueError(f"{base}.idx.bin does not match meta.json{hint}")
                has_mask = os.path.isfile(base + ".mask.bin")
                if has_mask and os.path.getsize(base + ".mask.bin") != info["tokens"]:
                    raise ValueError(f"{base}.mask.bin does not match meta.json{hint}")
                self.mask[split] = np.memmap(base + ".mask.bin", dtype=np.uint8, mode="r") if has_mask else None
        self._perms, self._warned = {}, set()

    def n_tokens(self, split: str) -> int:
        return self.meta["splits"][split]["tokens"]

    def n_examples(self, split: str) -> int | None:
        return self.meta["splits"][split]["examples"]

    def example(self, split: str, i: int):
        """(tokens, mask) of example i as int64 / uint8 numpy arrays (mask all ones when the split has none)."""
        lo, hi = self.idx[split][i], self.idx[split][i + 1]
        tokens = self.data[split][lo:hi].astype(np.int64)
        mask = self.mask[split]
        return tokens, (np.ones_like(tokens, dtype=np.uint8) if mask is None else np.array(mask[lo:hi]))

    def max_token(self, split: str) -> int:
        info = self.meta["splits"][split]
        if "max_token" not in info:  # older/foreign meta: one pass over the memmap, then cached in memory
            info["max_token"] = int(self.data[split].max())
        return info["max_token"]

    def check(self, vocab_size: int, block_size: int, tokenizer_spec: str | None = None, n_vocab: int | None = None):
        """Raise ValueError unless this data fits a model with vocab_size and block_size and the run's tokenizer (and
        that tokenizer's n_vocab tokens fit the model too)."""
        if n_vocab is not None and n_vocab > vocab_size:
            raise ValueError(f"tokenizer {tokenizer_spec!r} has {n_vocab} tokens > model vocab_size {vocab_size} "
                             "(tokenizer='': the base's)")
        if tokenizer_spec is not None and not _same_spec(tokenizer_spec, self.tokenizer):
            raise ValueError(f"dataset {self.path} was tokenized with {self.tokenizer!r} but the run uses "
                             f"{tokenizer_spec!r}; re-run its prepare.py with --tokenizer={tokenizer_spec}")
        for split in self.data:
            if self.max_token(split) >= vocab_size:
                raise ValueError(f"dataset {self.path} split {split!r} has token id {self.max_token(split)} >= "
                                 f"model vocab_size {vocab_size}")
            if self.kind == "stream" and self.n_tokens(split) < block_size + 1:
                raise ValueError(f"dataset {self.path} split {split!r} has {self.n_tokens(split)} tokens, fewer "
                                 f"than block_size + 1 = {block_size + 1}; lower block_size or prepare more data")
        for split in self.idx:
            self._warn_truncation(split, block_size)

    def _warn_truncation(self, split, block_size):
        if (split, block_size) not in self._warned:
            self._warned.add((split, block_size))
            n_long = int((np.diff(self.idx[split]) > block_size + 1).sum())
            if n_long:
                warnings.warn(f"{self.path} {split}: {n_long} of {self.n_examples(split)} examples are longer than "
                              f"block_size + 1 = {block_size + 1} tokens and will be truncated", stacklevel=3)

    def _example_xy(self, split, i, block_size):
        """x = tokens[:-1], y = tokens[1:] with masked targets -100; truncated to block_size, right-padded."""
        tokens, mask = self.example(split, i)
        tokens, mask = tokens[:block_size + 1], mask[:block_size + 1]
        x = np.zeros(block_size, dtype=np.int64)
        y = np.full(block_size, IGNORE, dtype=np.int64)
        n = max(len(tokens) - 1, 0)
        x[:n] = tokens[:-1]
        y[:n] = np.where(mask[1:] == 1, tokens[1:], IGNORE)
        return x, y

    def _perm(self, split, seed, epoch):
        key = (split, seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 4:  # a step touches at most two epochs
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = torch.randperm(self.n_examples(split), generator=_generator(seed, split, epoch)).numpy()
        return self._perms[key]

    def get_batch(self, split, batch_size, block_size, seed, it, micro=0, grad_accum=1, rank=0, world=1):
        """(x, y) int64 (batch_size, block_size) CPU tensors, a pure function of the arguments.
        stream: random windows from a generator seeded by (seed, split, g) with g = (it * grad_accum + micro) * world
        + rank, the global micro-batch index, so a global batch does not depend on how it is split over processes.
        examples: sample number p = ((it * grad_accum + micro) * world + rank) * batch_size + j (j < batch_size) is
        example perm_e[p % n] with e = p // n and perm_e a permutation seeded by (seed, split, e): every example is
        seen exactly once per epoch across iterations, micro-steps and ranks (keep batch_size, grad_accum and world
        fixed across a resume)."""
        if self.kind == "stream":
            data = self.data[split]
            if len(data) <= block_size:
                raise ValueError(f"{self.path} {split}: {len(data)} tokens, need more than block_size = {block_size}")
            g = (it * grad_accum + micro) * world + rank
            ix = torch.randint(len(data) - block_size, (batch_size,), generator=_generator(seed, split, g))
            xy = torch.from_numpy(np.stack([data[i:i + block_size + 1].astype(np.int64) for i in ix.tolist()]))
            return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
        self._warn_truncation(split, block_size)
        n = self.n_examples(split)
        start = ((it * grad_accum + micro) * world + rank) * batch_size
        rows = [self._example_xy(split, self._perm(split, seed, p // n)[p % n], block_size)
                for p in range(start, start + batch_size)]
        return (torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows])))

    def eval_batches(self, split, batch_size, block_size, max_batches=None):
        """Deterministic (x, y) batches in a fixed order, the same every call: stream = consecutive
        non-overlapping windows from the start, examples = examples in order. The last batch may be smaller."""
        if self.kind == "stream":
            data, n = self.data[split], (self.n_tokens(split) - 1) // block_size  # windows need block_size + 1 tokens
        else:
            n = self.n_examples(split)
            self._warn_truncation(split, block_size)
        n_batches = -(-n // batch_size) if max_batches is None else min(max_batches, -(-n // batch_size))
        for b in range(n_batches):
            items = range(b * batch_size, min((b + 1) * batch_size, n))
            if self.kind == "stream":
                xy = torch.from_numpy(np.stack([data[i * block_size:(i + 1) * block_size + 1].astype(np.int64)
                                                for i in items]))
                yield xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
            else:
                rows = [self._example_xy(split, i, block_size) for i in items]
                yield torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def _same_spec(a: str, b: str) -> bool:
    """Tokenizer specs match as strings, or as paths to the same directory."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))
