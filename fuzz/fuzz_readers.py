"""Fuzz fastmlp's two file readers: ``fm.datasets.read_idx`` and ``fm.load_model``.

The contract (design.md, "Errors"): whatever bytes a file holds, the reader returns a
result or raises ValueError naming the file -- never another exception, a hang or an
allocation the file does not justify. This harness feeds the reader mutated files and
stops at the first input that breaks the contract:

- an exception other than ValueError, or a ValueError whose message lacks the path;
- an input that runs longer than ``--hang-seconds`` (10 s);
- an input after which the process' peak resident memory grew by more than
  ``--rss-growth-mb`` (512 MB), or a MemoryError: the address space is capped at the
  start plus ``--memory-mb`` (4 GB), so a huge allocation fails at once instead of
  swapping.

Each input is written to one temporary file, read back by the reader under test.
A finding is saved into the corpus folder (``crash-<sha1>``, ``hang-<sha1>``,
``memory-<sha1>``; libFuzzer's own hang watchdog writes ``timeout-<sha1>``), reported,
and the script exits non-zero; once the reader is fixed, the saved file stays there as
a regression case (tests/test_fuzz.py reads every corpus file). ``--keep-going``
records every distinct finding (by exception and where it came from) and goes on.

Engines: with atheris installed (``pip install atheris``, or the ``fuzz`` extra) it
drives libFuzzer with coverage of the fastmlp package, mixing libFuzzer's byte
mutations with the format-aware ones below; without it, a built-in mutation fuzzer
runs (seeded, deterministic for a given ``--seed`` up to the time limit): byte flips,
inserts, deletes, splices and "interesting" integers on the corpus files, plus
structured mutations -- the IDX header's sizes, the data inside a gzip member, the
JSON configuration and the tensor table of a model file. Inputs that produce a new
outcome join the pool, so the fallback explores past the first check.

    python fuzz/fuzz_readers.py {idx,model} --seconds 60 [--corpus DIR] [--seed N]
                                [--engine auto|atheris|builtin] [--keep-going]
"""
from __future__ import annotations

import argparse
import copy
import faulthandler
import gzip
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("idx", "model")
MAX_LEN = 1 << 16  # the longest input tried: keeps each file (and a saved finding) small


class Finding(Exception):
    """An input that broke the contract; ``kind`` names the file it is saved as."""

    def __init__(self, kind: str, what: str):
        super().__init__(what)
        self.kind = kind


class Hang(BaseException):
    """Raised by the SIGALRM handler inside a reader that runs too long (a BaseException,
    so that no ``except Exception`` in the reader swallows it)."""


# --------------------------------------------------------------------------- mutations

# Values at the edges of the integer widths a reader decodes (sizes, lengths, counts).
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
               0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**32, 2**62, 2**63 - 1, 2**63,
               2**64 - 1)

# JSON values to put in place of a configuration entry: wrong types, edge numbers (NaN
# and Infinity are what Python's json writes and reads for the non-finite floats),
# strings the readers know, containers, and a nesting deeper than a recursive reader.
JSON_VALUES = (None, True, False, 0, 1, -1, 2, 10, 2**31, 2**63, 2**64, 10**12, 10**30,
               10**400, 0.5, -0.0, 1e-300, 1e308, float("nan"), float("inf"), float("-inf"),
               "", "x", "0", "1", "relu", "softmax", "linear", "Dense", "adam", "sgd",
               "adamw", "accuracy", "zeros", "sparse_categorical_crossentropy",
               "fastmlp.sequential", [], {}, [0], [1, 2], [0.9, 0.999], {"class": "Dense"},
               "a" * 5000)

SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "I16", "U16", "I32",
                      "U32", "I64", "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
                      "F6_E2M3")
DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "BOOL": 1, "I16": 2,
              "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "C64": 8, "F8_E4M3": 1,
              "F8_E5M2": 1, "F8_E8M0": 1}


def _put_int(data: bytearray, rng: random.Random) -> None:
    width = rng.choice((1, 2, 4, 8))
    if len(data) < width:
        return
    pos = rng.randrange(len(data) - width + 1)
    value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
    data[pos:pos + width] = value.to_bytes(width, rng.choice(("big", "little")))


def mutate_bytes(data: bytes, rng: random.Random, pool) -> bytes:
    """One to four byte-level edits of ``data`` (splices draw from ``pool``)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(out)
        if op == 0 and n:    # flip a bit
            i = rng.randrange(n)
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # a random byte
            out[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:        # insert random bytes
            i = rng.randint(0, n)
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3 and n:  # delete a range
            i = rng.randrange(n)
            del out[i:i + rng.randint(1, max(1, n // 4))]
        elif op == 4 and n:  # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 64))
            k = rng.randint(0, n)
            out[k:k] = out[i:j]
        elif op == 5:        # an interesting integer, either byte order
            _put_int(out, rng)
        elif op == 6:        # splice: our head, another input's tail
            other = rng.choice(pool)
            out = out[:rng.randint(0, n)] + other[rng.randint(0, len(other)):]
        elif op == 7 and n:  # truncate
            del out[rng.randrange(n):]
        else:                # append
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(out)


def mutate_idx(data: bytes, rng: random.Random, pool) -> bytes:
    """IDX-aware edits: the header's rank and sizes, the data inside a gzip member
    (recompressed, so the reader gets past the gzip layer), or plain byte edits."""
    inner, gz = data, data[:2] == b"\x1f\x8b"
    if gz:
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return mutate_bytes(data, rng, pool)
    choice = rng.randrange(5)
    if choice == 4 and len(inner) >= 4:
        # A new header, the data kept: any rank (NumPy holds at most 32 or 64), sizes
        # whose product overflows 64 bits, a zero among huge sizes.
        rank = rng.choice((1, 2, 3, 4, 8, 32, 33, 64, 65, 255))
        dims = [rng.choice((0, 1, 2, 3, 4, 28, 0xFFFF, 0x80000000, 0xFFFFFFFF))
                for _ in range(rank)]
        old_rank = inner[3]
        inner = inner[:3] + bytes([rank]) + struct.pack(f">{rank}I", *dims) \
            + inner[4 + 4 * old_rank:]
    elif choice == 0 and len(inner) >= 4:  # the rank byte, or one size
        out = bytearray(inner)
        rank = out[3]
        if rank and rng.random() < 0.7 and len(out) >= 4 + 4 * rank:
            i = 4 + 4 * rng.randrange(rank)
            out[i:i + 4] = (rng.choice(INTERESTING) & 0xFFFFFFFF).to_bytes(4, "big")
        else:
            out[3] = rng.choice((0, 1, 2, 3, 4, 32, 33, 64, 65, 255))
        inner = bytes(out)
    elif choice == 1:  # a type code
        if len(inner) >= 4:
            inner = inner[:2] + bytes([rng.choice((8, 9, 0xB, 0xC, 0xD, 0xE, 0xF, 0))]) \
                + inner[3:]
    else:
        inner = mutate_bytes(inner, rng, pool)
    if gz or rng.random() < 0.2:
        # A multi-member stream or a bomb now and then: long runs compress ~1000:1.
        if rng.random() < 0.1:
            inner += b"\x00" * rng.choice((1, 4096, 1 << 20, 4 << 20))
        return gzip.compress(inner, compresslevel=1, mtime=0)
    return inner


def _split_safetensors(data: bytes):
    """(header dict, body bytes) of a safetensors file, or None."""
    if len(data) < 8:
        return None
    n = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + n:]) if isinstance(header, dict) else None


def _join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _json_nodes(value, path=()):
    """Every (path, value) inside a JSON value, the root first."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_nodes(v, path + (i,))


# Stands for a list nested ``depth`` deep: json.dumps would recurse as deep, so the
# nesting is written into the text after dumping (see _dumps).
_DEEP = "__fuzz_nested_{}__"


def _json_value(rng: random.Random):
    if rng.random() < 0.05:  # nested deeper than Python's recursion limit
        return _DEEP.format(rng.choice((100, 1100, 3000)))
    return copy.deepcopy(rng.choice(JSON_VALUES))


def _dumps(value) -> str:
    text = json.dumps(value)
    for depth in re.findall(r'"__fuzz_nested_(\d+)__"', text):
        text = text.replace(f'"{_DEEP.format(depth)}"', "[" * int(depth) + "]" * int(depth))
    return text


def mutate_json(meta, rng: random.Random):
    """Replace, delete, add, duplicate or swap one entry of a JSON value (in place when
    it is a container); returns the new value."""
    nodes = list(_json_nodes(meta))[1:]  # below the root
    if not nodes or rng.random() < 0.03:
        return _json_value(rng)  # the root itself
    path, node = rng.choice(nodes)
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.randrange(6)
    if op == 0:    # delete
        del parent[key]
    elif op == 1 and isinstance(node, dict):  # a new entry
        node[rng.choice(("units", "input_dim", "extra", "class", "lr", "seed", "x"))] = \
            _json_value(rng)
    elif op == 2 and isinstance(node, list) and node:  # duplicate an item (a layer, ...)
        node.insert(rng.randrange(len(node) + 1), copy.deepcopy(rng.choice(node)))
    elif op == 3 and isinstance(parent, list) and len(parent) > 1:  # swap two items
        j = rng.randrange(len(parent))
        parent[key], parent[j] = parent[j], parent[key]
    elif op == 4 and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[key] = rng.choice((node + 1, node - 1, -node, node * 2, 0))  # near the value
    else:
        parent[key] = _json_value(rng)
    return meta


def _retype(header: dict, body: bytes, name: str, rng: random.Random) -> bytes:
    """Re-encode float32 tensor ``name`` as another NumPy type, same shape, the body
    laid out afresh: a well-formed file whose tensor fastmlp did not write."""
    import numpy as np

    entry = header[name]
    begin, end = entry["data_offsets"]
    new_type = rng.choice((("F64", "<f8"), ("F16", "<f2"), ("I32", "<i4"), ("U8", "u1"),
                           ("BOOL", "?")))
    tensors = {}
    for key, e in header.items():
        if key != "__metadata__":
            tensors[key] = body[e["data_offsets"][0]:e["data_offsets"][1]]
    with np.errstate(all="ignore"):  # NaN, Inf and overflow are data to the reader
        tensors[name] = np.frombuffer(body[begin:end], "<f4").astype(new_type[1]).tobytes()
    entry["dtype"] = new_type[0]
    out, pos = [], 0
    for key, raw in tensors.items():
        header[key]["data_offsets"] = [pos, pos + len(raw)]
        out.append(raw)
        pos += len(raw)
    return b"".join(out)


def mutate_model(data: bytes, rng: random.Random, pool) -> bytes:
    """Model-file-aware edits: the fastmlp JSON configuration, the safetensors tensor
    table (dtypes, shapes, offsets, names, a tensor re-encoded), or byte edits."""
    split = _split_safetensors(data)
    if split is None or rng.random() < 0.25:
        return mutate_bytes(data, rng, pool)
    header, body = split
    md = header.get("__metadata__")
    meta_raw = md.get("fastmlp") if isinstance(md, dict) else None
    names = [k for k in header if k != "__metadata__"]
    try:
        if isinstance(meta_raw, str) and (rng.random() < 0.6 or not names):
            meta = json.loads(meta_raw)
            for _ in range(rng.randint(1, 3)):
                meta = mutate_json(meta, rng)
            md["fastmlp"] = _dumps(meta)
            return _join_safetensors(header, body)
        name = rng.choice(names)
        entry = header[name]
        op = rng.randrange(6)
        if op == 0:
            # Another dtype over the same bytes, the shape flattened to fit when it can.
            dtype = rng.choice(SAFETENSORS_DTYPES)
            begin, end = entry["data_offsets"]
            entry["dtype"] = dtype
            if (end - begin) % DTYPE_SIZE.get(dtype, 1) == 0:
                entry["shape"] = [(end - begin) // DTYPE_SIZE.get(dtype, 1)]
        elif op == 1 and entry["dtype"] == "F32":
            body = _retype(header, body, name, rng)
        elif op == 2:  # a size, or the rank
            shape = entry["shape"]
            if shape and rng.random() < 0.7:
                shape[rng.randrange(len(shape))] = rng.choice(INTERESTING)
            elif rng.random() < 0.5:
                shape.append(1)
            elif shape:
                shape.pop()
        elif op == 3:  # an offset
            entry["data_offsets"][rng.randrange(2)] = rng.choice(INTERESTING)
        elif op == 4:  # rename: a tensor the reader does not expect, or one missing
            header[rng.choice(("layers.0.kernel", "layers.1.bias", "layers.2.kernel",
                               "optimizer.0.exp_avg", "optimizer.9.exp_avg",
                               "optimizer.0.momentum_buffer", "x"))] = header.pop(name)
        else:  # drop it from the table (its bytes stay: "not fully covered")
            del header[name]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return mutate_bytes(data, rng, pool)  # an input already too broken to edit
    return _join_safetensors(header, body)


MUTATORS = {"idx": mutate_idx, "model": mutate_model}


def mutate(target: str, data: bytes, rng: random.Random, pool) -> bytes:
    return MUTATORS[target](data, rng, pool)[:MAX_LEN]


# --------------------------------------------------------------------------- the oracle


class Runner:
    """Runs the reader under test on one input and classifies the outcome."""

    def __init__(self, target: str, reader, corpus: Path, hang_s: float, rss_growth_mb: int,
                 own_alarm: bool):
        self.target, self.reader, self.corpus = target, reader, corpus
        self.hang_s, self.own_alarm = hang_s, own_alarm
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"fastmlp-fuzz-{target}-"))
        self.file = self.tmpdir / ("input.safetensors" if target == "model" else "input.idx")
        self.rss_growth_kb = rss_growth_mb * 1024
        self.rss_limit_kb = _peak_rss_kb() + self.rss_growth_kb
        self.outcomes: Counter = Counter()
        self.executions = 0
        self.start = time.monotonic()

    def outcome(self, data: bytes) -> str:
        """"ok" or "ValueError: <first words>"; raises Finding when the contract breaks."""
        self.file.write_bytes(data)
        if self.own_alarm:
            signal.setitimer(signal.ITIMER_REAL, self.hang_s)
            # A reader stuck in C code never returns to the alarm handler: then dump
            # the stacks and exit (the input stays in self.file).
            faulthandler.dump_traceback_later(3 * self.hang_s, exit=True)
        try:
            self.reader(self.file)
            result = "ok"
        except ValueError as e:
            msg = str(e)
            if str(self.file) not in msg:
                raise Finding("crash", f"ValueError without the file's name: {msg[:300]}") \
                    from e
            result = "ValueError: " + _first_words(msg.split(str(self.file), 1)[1])
        except Hang as e:
            raise Finding("hang", f"one input ran longer than {self.hang_s} s") from e
        except MemoryError as e:
            raise Finding("memory", "MemoryError: the reader tried a huge allocation") from e
        except Exception as e:
            raise Finding("crash", f"{type(e).__name__}: {str(e)[:300]}") from e
        finally:
            if self.own_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
        peak = _peak_rss_kb()
        if peak > self.rss_limit_kb:
            self.rss_limit_kb = peak + self.rss_growth_kb  # the peak never comes down
            raise Finding("memory", f"peak memory grew to {peak // 1024} MB")
        self.executions += 1
        self.outcomes[result] += 1
        return result

    def save(self, finding: Finding, data: bytes) -> Path:
        self.corpus.mkdir(parents=True, exist_ok=True)
        path = self.corpus / f"{finding.kind}-{hashlib.sha1(data).hexdigest()}"
        path.write_bytes(data)
        return path

    def report(self, engine: str, seed: int, pool_size: int, seeds: int) -> str:
        secs = time.monotonic() - self.start
        lines = [f"fuzz_readers {self.target}: engine {engine}, seed {seed}",
                 f"  executions: {self.executions} in {secs:.1f} s "
                 f"({self.executions / max(secs, 1e-9):.0f}/s)",
                 f"  corpus: {seeds} files read from {self.corpus}, pool {pool_size}",
                 f"  distinct outcomes: {len(self.outcomes)}"]
        lines += [f"    {n:9d}  {what}" for what, n in self.outcomes.most_common()]
        return "\n".join(lines)

    def close(self):
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# Words a message prints as values (a JSON literal, the kind of a container).
_VALUE_WORDS = {"None", "True", "False", "nan", "inf", "JSON", "list", "object"}


def _first_words(msg: str) -> str:
    """The first three words of an error message, without the values it quotes (so that
    the outcomes fold into a handful of kinds)."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", " ", msg)
    words = [w for w in re.findall(r"[A-Za-z_]{2,}", msg) if w not in _VALUE_WORDS]
    return " ".join(words[:3])


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _cap_address_space(headroom_mb: int) -> None:
    """Let the process map at most what it maps now plus ``headroom_mb``: a reader
    that asks for gigabytes gets a MemoryError at once (a finding) instead of paging."""
    try:
        with open("/proc/self/statm") as f:
            vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return  # not Linux: only the peak-RSS check applies
    limit = vm_bytes + headroom_mb * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit <= hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _load_corpus(folder: Path) -> list[bytes]:
    if not folder.is_dir():
        return []
    return [p.read_bytes()[:MAX_LEN] for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".")]


def _signature(finding: Finding) -> str:
    """What makes two findings the same bug: the kind, the exception and where it came
    from (the innermost frame)."""
    cause = finding.__cause__
    if cause is None or cause.__traceback__ is None:
        return f"{finding.kind}: {str(finding)[:40]}"
    frame = traceback.extract_tb(cause.__traceback__)[-1]
    return f"{finding.kind}: {type(cause).__name__} at {Path(frame.filename).name}:{frame.lineno}"


def _report_finding(runner: Runner, finding: Finding, data: bytes) -> None:
    """Save the input into the corpus folder, and say what happened and how to rerun it."""
    saved = runner.save(finding, data)
    reader = "load_model" if runner.target == "model" else "datasets.read_idx"
    print(f"FINDING ({finding.kind}): {finding}\n  input saved as {saved} ({len(data)} bytes)"
          f"\n  reproduce: python -c \"import fastmlp as fm; fm.{reader}('{saved}')\"",
          file=sys.stderr)
    if finding.__cause__ is not None:
        traceback.print_exception(finding.__cause__, file=sys.stderr)
    sys.stderr.flush()


def _summary(runner: Runner, findings: dict) -> str:
    if not findings:
        return "  findings: none"
    return "\n".join([f"  findings: {len(findings)} distinct"]
                     + [f"    {n:9d}  {sig}" for sig, n in findings.items()])


# --------------------------------------------------------------------------- engines


def _record(runner: Runner, findings: dict, finding: Finding, data: bytes) -> None:
    """Count a finding by its signature; the first of each is reported and saved."""
    sig = _signature(finding)
    if sig not in findings:
        _report_finding(runner, finding, data)
    findings[sig] = findings.get(sig, 0) + 1


def run_builtin(runner: Runner, seeds: list[bytes], seconds: float, seed: int,
                keep_going: bool) -> int:
    """The fallback fuzzer: mutate the pool, keep inputs with a new outcome."""
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    seen, findings = set(), {}
    deadline = time.monotonic() + seconds
    inputs = list(pool)  # the seeds themselves run first
    while True:
        if inputs:
            data = inputs.pop(0)
        else:
            if time.monotonic() >= deadline:
                break
            data = mutate(runner.target, rng.choice(pool), rng, pool)
        try:
            result = runner.outcome(data)
        except Finding as finding:
            _record(runner, findings, finding, data)
            if not keep_going:
                break
            continue
        if result not in seen:
            seen.add(result)
            pool.append(data)
    print(runner.report("builtin", seed, len(pool), len(seeds)))
    print(_summary(runner, findings))
    return 1 if findings else 0


def run_atheris(atheris, runner: Runner, seeds: list[bytes], seconds: float, seed: int,
                keep_going: bool) -> int:
    """libFuzzer through atheris, on a scratch copy of the corpus (libFuzzer adds the
    inputs that reach new code to its first folder; ours stays as committed)."""
    work = Path(tempfile.mkdtemp(prefix="fastmlp-fuzz-work-"))
    for i, data in enumerate(seeds):
        (work / f"seed{i}").write_bytes(data)
    deadline = time.monotonic() + seconds
    findings = {}

    def finish(status: int) -> None:
        # libFuzzer ends a run without returning to Python: report and leave from here.
        print(runner.report("atheris", seed, len(list(work.iterdir())), len(seeds)))
        print(_summary(runner, findings))
        sys.stdout.flush()
        shutil.rmtree(work, ignore_errors=True)
        runner.close()
        os._exit(status)

    def test_one_input(data: bytes) -> None:
        if time.monotonic() >= deadline:
            finish(1 if findings else 0)
        try:
            runner.outcome(data)
        except Finding as finding:
            _record(runner, findings, finding, data)
            if not keep_going:
                finish(1)

    def custom_mutator(data: bytes, max_size: int, mseed: int) -> bytes:
        rng = random.Random(mseed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate(runner.target, data, rng, seeds or [b""])[:max_size]

    # Hangs: libFuzzer's own -timeout watchdog saves the input as timeout-<sha1> into
    # the corpus folder (-artifact_prefix) and exits non-zero. Memory: our checks.
    args = [sys.argv[0], str(work), f"-max_total_time={int(seconds) + 60}",
            f"-timeout={int(runner.hang_s)}", f"-artifact_prefix={runner.corpus}{os.sep}",
            f"-seed={seed or 1}",  # libFuzzer reads 0 as "pick one at random"
            f"-max_len={MAX_LEN}", "-rss_limit_mb=0"]
    runner.corpus.mkdir(parents=True, exist_ok=True)
    atheris.Setup(args, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()  # returns only through finish()
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The module docstring says more.")
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--seconds", type=float, default=60.0, help="campaign length (default 60)")
    ap.add_argument("--corpus", type=Path, default=None,
                    help="seed folder, where findings are saved (default tests/fuzz_corpus/"
                         "<target>)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto",
                    help="atheris when importable (auto, the default), or the built-in one")
    ap.add_argument("--keep-going", action="store_true",
                    help="record every distinct finding and go on (exit 1 at the end)")
    ap.add_argument("--hang-seconds", type=float, default=10.0)
    ap.add_argument("--rss-growth-mb", type=int, default=512)
    ap.add_argument("--memory-mb", type=int, default=4096,
                    help="address space allowed beyond the start (default 4096)")
    args = ap.parse_args(argv)
    corpus = (args.corpus or ROOT / "tests" / "fuzz_corpus" / args.target).resolve()

    atheris = None
    if args.engine in ("auto", "atheris"):
        try:
            import atheris
        except ImportError:
            if args.engine == "atheris":
                raise
    if atheris is not None:
        with atheris.instrument_imports(include=["fastmlp"]):
            import fastmlp as fm
    else:
        import fastmlp as fm
    reader = {"idx": fm.datasets.read_idx, "model": fm.load_model}[args.target]

    seeds = _load_corpus(corpus)
    runner = Runner(args.target, reader, corpus, args.hang_seconds, args.rss_growth_mb,
                    own_alarm=atheris is None)
    print(f"fuzz_readers {args.target}: fastmlp from {Path(fm.__file__).parent}, "
          f"inputs written to {runner.file}", flush=True)
    if atheris is None:
        def on_alarm(signum, frame):
            raise Hang()
        signal.signal(signal.SIGALRM, on_alarm)
    _cap_address_space(args.memory_mb)
    try:
        if atheris is not None:
            return run_atheris(atheris, runner, seeds, args.seconds, args.seed, args.keep_going)
        return run_builtin(runner, seeds, args.seconds, args.seed, args.keep_going)
    finally:
        runner.close()


if __name__ == "__main__":
    sys.exit(main())
