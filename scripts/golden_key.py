"""Independent re-implementation of ecic's stage-key encoding (src/plan/fingerprint.rs),
used to produce the golden key pinned in tests/engine_keys.rs. Needs `pip install blake3`."""
import struct, blake3

def u64(n): return struct.pack("<Q", n)
def s(x): b = x.encode(); return u64(len(b)) + b

def canon(v):
    if v is None: return b"n"
    if v is True: return b"T"
    if v is False: return b"F"
    if isinstance(v, int): return b"i" + struct.pack("<q", v)
    if isinstance(v, float): return b"f" + struct.pack("<d", v)
    if isinstance(v, str): return b"s" + s(v)
    if isinstance(v, list): return b"[" + u64(len(v)) + b"".join(canon(x) for x in v)
    if isinstance(v, dict):
        return b"{" + u64(len(v)) + b"".join(s(k) + canon(v[k]) for k in sorted(v))
    raise TypeError(v)

def key(kind, version, params, inputs, digest, seed):
    h = b"ecic-stage-key-v1\0" + s(kind) + struct.pack("<I", version) + canon(params)
    h += u64(len(inputs)) + b"".join(s(k) for k in inputs) + s(digest) + u64(seed)
    return blake3.blake3(h).hexdigest()

if __name__ == "__main__":
    print(key("evaluate", 1, {"b": 1, "a": [1.5, "x", True, None]}, ["ab", "cd"], "d", 7))
