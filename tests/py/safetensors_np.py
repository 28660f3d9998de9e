"""safetensors_np - a small, independent safetensors reader/writer (stdlib + numpy).

Written from /work/shared/spec/FORMATS.md (not from the C code) so the Python
tests can act as an oracle for the C reader/writer in src/io/safetensors.c.

File layout (FORMATS.md, "safetensors"):

    u64 little-endian N | N bytes of UTF-8 JSON header | data buffer

The header is a JSON object mapping tensor name ->
``{"dtype": "BF16", "shape": [..], "data_offsets": [b, e]}`` plus an optional
``"__metadata__"`` object of string -> string. Offsets are relative to the start
of the data buffer; data is little-endian, row-major.

A reader rejects (here: ``ValueError`` whose message names the file and, where
there is one, the tensor): N > 100 MB, a header that runs past the file,
invalid UTF-8/JSON, an unknown dtype, ``e - b != prod(shape) * size(dtype)``,
offsets that do not tile the buffer exactly from 0 without gaps or overlaps,
``8 + N + last_end != file size`` and duplicate names. A writer pads the header
with spaces to a multiple of 8.

Public API
----------
``load(path)``            -> ({name: ndarray}, metadata)   BF16 decoded to float32
``load_raw(path)``        -> {name: (dtype_str, shape_tuple, raw_bytes)}
``read_header(path)``     -> (header_len, header_dict, metadata)  (validated)
``save(path, tensors, metadata=None)``  tensors: {name: (dtype_str, ndarray)}
``header_bytes(entries, metadata)``  the padded header for hand-built files
``load_model_dir(dir)``   -> (config_dict, {name: ndarray})
``bf16_bits_to_f32(u16)`` / ``f32_to_bf16_bits(f32)``  the BF16 conversions
``encode(dtype, array)`` / ``decode(dtype, shape, raw)``  one tensor's bytes
"""

import json
import os
import struct

import numpy as np

__all__ = [
    "MAX_HEADER", "DTYPES", "load", "load_raw", "read_header", "save", "load_model_dir",
    "bf16_bits_to_f32", "f32_to_bf16_bits", "encode", "decode", "header_bytes",
]

# Header length limit (FORMATS.md: "N > 100 MB" is an error; same value as the
# reference implementation).
MAX_HEADER = 100_000_000

# Every dtype name of the safetensors format -> (element size in bytes, numpy
# dtype used to decode it, or None when numpy has no native type). The project
# only *uses* BF16/F16/F32 but the reader knows the whole list so that a known
# but unsupported dtype (e.g. I64) is distinguishable from a bogus one.
DTYPES = {
    "BOOL": (1, np.dtype("?")),
    "U8": (1, np.dtype("u1")),
    "I8": (1, np.dtype("i1")),
    "F8_E5M2": (1, None),
    "F8_E4M3": (1, None),
    "I16": (2, np.dtype("<i2")),
    "U16": (2, np.dtype("<u2")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),  # raw bits; decoded to float32 by load()
    "I32": (4, np.dtype("<i4")),
    "U32": (4, np.dtype("<u4")),
    "F32": (4, np.dtype("<f4")),
    "F64": (8, np.dtype("<f8")),
    "I64": (8, np.dtype("<i8")),
    "U64": (8, np.dtype("<u8")),
}


# ---------------------------------------------------------------- BF16 helpers

def bf16_bits_to_f32(bits):
    """uint16 BF16 bit patterns -> float32 values (exact: bits << 16)."""
    u = np.asarray(bits, dtype=np.uint16)
    return (u.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x):
    """float32 values -> uint16 BF16 bits, round to nearest, ties to even.

    NaNs stay NaN (quieted, sign kept); infinities and overflow to inf follow
    IEEE round-to-nearest like every BF16 converter (torch, numpy ml_dtypes)."""
    f = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    nan = np.isnan(f)
    quiet = (u >> np.uint64(16)) | np.uint64(0x0040)
    out = np.where(nan, quiet, rounded)
    return out.astype(np.uint16)


# ------------------------------------------------------------- tensor bytes

def _shape_numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def encode(dtype, array):
    """Little-endian bytes of one tensor stored as `dtype`.

    BF16 accepts floating arrays (rounded to nearest even) or uint16 arrays
    (taken as raw BF16 bits). Other dtypes are converted with numpy's astype
    (F16: numpy rounds to nearest even)."""
    if dtype not in DTYPES:
        raise ValueError("unknown dtype %r" % (dtype,))
    a = np.asarray(array)
    if dtype == "BF16":
        bits = a.astype(np.uint16) if a.dtype == np.uint16 else f32_to_bf16_bits(a.astype(np.float32))
        return np.ascontiguousarray(bits, dtype="<u2").tobytes()
    npdt = DTYPES[dtype][1]
    if npdt is None:
        if a.dtype != np.uint8:
            raise ValueError("dtype %s: pass raw uint8 bit patterns" % dtype)
        return np.ascontiguousarray(a).tobytes()
    with np.errstate(over="ignore", invalid="ignore"):  # F16 overflow -> inf is intended
        return np.ascontiguousarray(a.astype(npdt)).tobytes()


def decode(dtype, shape, raw):
    """numpy array of one tensor from its raw bytes (BF16 -> float32, F8 -> uint8 bits)."""
    size, npdt = DTYPES[dtype]
    shape = tuple(int(d) for d in shape)
    if len(raw) != _shape_numel(shape) * size:
        raise ValueError("%s tensor of shape %s needs %d bytes, got %d"
                         % (dtype, list(shape), _shape_numel(shape) * size, len(raw)))
    if npdt is None:
        npdt = np.dtype("u1")
    a = np.frombuffer(raw, dtype=npdt).reshape(shape).copy()
    if dtype == "BF16":
        a = bf16_bits_to_f32(a)
    elif npdt.byteorder == "<":
        a = a.astype(npdt.newbyteorder("="))
    return a


# ------------------------------------------------------------------ reading

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Duplicate(k)
        d[k] = v
    return d


class _Duplicate(Exception):
    pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _parse(path, blob):
    """Validate a whole file image; return (N, entries, metadata) where entries
    is a list of (name, dtype, shape, begin, end) in header order."""
    p = str(path)
    if len(blob) < 8:
        raise ValueError("%s: file is %d bytes, shorter than the 8-byte header length" % (p, len(blob)))
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER:
        raise ValueError("%s: header length %d exceeds the %d-byte limit" % (p, n, MAX_HEADER))
    if 8 + n > len(blob):
        raise ValueError("%s: header length %d runs past the end of the file (%d bytes)" % (p, n, len(blob)))
    try:
        text = blob[8:8 + n].decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise ValueError("%s: header is not valid UTF-8 (%s)" % (p, e)) from None
    try:
        hdr = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise ValueError("%s: duplicate key '%s' in header JSON" % (p, e.args[0])) from None
    except ValueError as e:
        raise ValueError("%s: header is not valid JSON (%s)" % (p, e)) from None
    if not isinstance(hdr, dict):
        raise ValueError("%s: header JSON is not an object" % p)

    meta = {}
    if "__metadata__" in hdr:
        m = hdr["__metadata__"]
        if not isinstance(m, dict):
            raise ValueError("%s: __metadata__ is not an object" % p)
        for k, v in m.items():
            if not isinstance(v, str):
                raise ValueError("%s: __metadata__ value for '%s' is not a string" % (p, k))
        meta = dict(m)

    entries = []
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        where = "%s: tensor '%s'" % (p, name)
        if not isinstance(info, dict):
            raise ValueError("%s: entry is not an object" % where)
        dtype = info.get("dtype")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if not isinstance(dtype, str):
            raise ValueError("%s: missing or non-string dtype" % where)
        if dtype not in DTYPES:
            raise ValueError("%s: unknown dtype %r" % (where, dtype))
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise ValueError("%s: shape must be a list of integers" % where)
        if any(d < 0 for d in shape):
            raise ValueError("%s: negative dimension in shape %s" % (where, shape))
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)):
            raise ValueError("%s: data_offsets must be a list of two integers" % where)
        b, e = offs
        if b < 0 or e < b:
            raise ValueError("%s: bad data_offsets [%d, %d]" % (where, b, e))
        need = _shape_numel(shape) * DTYPES[dtype][0]
        if e - b != need:
            raise ValueError("%s: data_offsets [%d, %d] span %d bytes but %s %s needs %d"
                             % (where, b, e, e - b, dtype, shape, need))
        entries.append((name, dtype, tuple(shape), b, e))

    # The offsets must tile [0, last_end) exactly.
    pos = 0
    for name, _, _, b, e in sorted(entries, key=lambda t: (t[3], t[4])):
        if b != pos:
            kind = "gap before" if b > pos else "overlap at"
            raise ValueError("%s: tensor '%s': data_offsets [%d, %d] leave a %s byte %d (expected start %d)"
                             % (p, name, b, e, kind, min(b, pos), pos))
        pos = e
    if 8 + n + pos != len(blob):
        raise ValueError("%s: file size %d != 8 + header %d + data %d"
                         % (p, len(blob), n, pos))
    return n, entries, meta


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def read_header(path):
    """Validate `path`; return (header_len, header dict as parsed, metadata)."""
    blob = _read(path)
    n, _, meta = _parse(path, blob)
    return n, json.loads(blob[8:8 + n].decode("utf-8")), meta


def load_raw(path):
    """Validate `path`; return {name: (dtype_str, shape_tuple, raw_bytes)} in header order."""
    blob = _read(path)
    n, entries, _ = _parse(path, blob)
    base = 8 + n
    return {name: (dt, shape, bytes(blob[base + b:base + e])) for name, dt, shape, b, e in entries}


def load(path):
    """Validate `path`; return ({name: numpy array}, metadata dict).

    BF16 -> float32 (exact), F16 -> float16, F32 -> float32, others -> their
    numpy type (F8 as raw uint8 bits). Shape [] gives a 0-d array."""
    blob = _read(path)
    n, entries, meta = _parse(path, blob)
    base = 8 + n
    out = {}
    for name, dt, shape, b, e in entries:
        try:
            out[name] = decode(dt, shape, blob[base + b:base + e])
        except ValueError as ex:  # e.g. more dimensions than numpy supports
            raise ValueError("%s: tensor '%s': %s" % (path, name, ex)) from None
    return out, meta


# ------------------------------------------------------------------ writing

def header_bytes(entries, metadata=None):
    """Padded header (without the 8-byte length) for [(name, dtype, shape, nbytes)]."""
    hdr = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError("metadata keys and values must be strings")
        hdr["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape, nbytes in entries:
        if name == "__metadata__" or name in hdr:
            raise ValueError("duplicate or reserved tensor name %r" % (name,))
        hdr[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def save(path, tensors, metadata=None):
    """Write {name: (dtype_str, numpy array)} to `path`, tensors in the given order.

    Header JSON is compact (non-ASCII kept as UTF-8), "__metadata__" first when
    given, padded with spaces to a multiple of 8."""
    entries, blobs = [], []
    for name, (dtype, arr) in tensors.items():
        a = np.asarray(arr)
        raw = encode(dtype, a)
        entries.append((name, dtype, a.shape, len(raw)))
        blobs.append(raw)
    hdr = header_bytes(entries, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)))
        f.write(hdr)
        for raw in blobs:
            f.write(raw)


# ------------------------------------------------------------- model dirs

def load_model_dir(directory):
    """Read a Hugging Face model directory: (config dict, {name: numpy array}).

    Uses model.safetensors.index.json when present (opening every shard it
    names; each listed tensor must be in the shard the index says, and every
    tensor of a shard must be listed), else model.safetensors. Raises
    ValueError for format violations, OSError for missing files."""
    with open(os.path.join(directory, "config.json"), "rb") as f:
        config = json.loads(f.read().decode("utf-8"))
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        tensors, _ = load(os.path.join(directory, "model.safetensors"))
        return config, tensors
    with open(index_path, "rb") as f:
        index = json.loads(f.read().decode("utf-8"))
    wm = index.get("weight_map")
    if not isinstance(wm, dict):
        raise ValueError("%s: missing weight_map object" % index_path)
    shards = {}
    tensors = {}
    for name, shard in wm.items():
        if shard not in shards:
            shards[shard], _ = load(os.path.join(directory, shard))
        if name not in shards[shard]:
            raise ValueError("%s: tensor '%s' is not in shard %s" % (index_path, name, shard))
        tensors[name] = shards[shard][name]
    for shard, ts in shards.items():
        extra = set(ts) - set(wm)
        if extra:
            raise ValueError("%s: shard %s holds tensors the index does not list: %s"
                             % (index_path, shard, sorted(extra)))
    return config, tensors
