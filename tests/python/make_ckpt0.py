"""Writes a checkpoint in the official Grok-1 release format (ckpt-0: one pickle per leaf of the
haiku parameter tree, numpy arrays and QuantizedWeight8bit, GROK1_SPEC.md section 6) from an
int8 Hugging Face-layout checkpoint written by `grokctl gen-model --dtype int8`.

    python3 make_ckpt0.py HF_DIR OUT_DIR [--fortran]

With --fortran every array of two or more dimensions (QuantizedWeight8bit weights and scales
included) is pickled in Fortran (column-major) order, as numpy writes a transposed array.
"""
import json
import os
import pickle
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np


# As the official code defines it (model.py), pickled as __main__.QuantizedWeight8bit.
@dataclass
class QuantizedWeight8bit:
    weight: np.ndarray
    scales: np.ndarray

    @property
    def shape(self):
        return self.weight.shape


DT = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "I8": np.int8}


def read_safetensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        b = open(os.path.join(d, f), "rb").read()
        n = int.from_bytes(b[:8], "little")
        h = json.loads(b[8 : 8 + n])
        for k, v in h.items():
            if k == "__metadata__":
                continue
            s, e = v["data_offsets"]
            out[k] = np.frombuffer(b[8 + n + s : 8 + n + e], dtype=DT[v["dtype"]]).reshape(v["shape"])
    return out


def main(src, dst, fortran=False):
    # C order, as the release; or Fortran order (the same values, column-major bytes).
    order = np.asfortranarray if fortran else np.ascontiguousarray
    cfg = json.load(open(os.path.join(src, "config.json")))
    t = read_safetensors(src)
    L, E = cfg["num_hidden_layers"], cfg["num_experts"]
    os.makedirs(dst, exist_ok=True)

    def qw(base, experts=None):
        if experts is None:
            w, s = t[base + ".weight"], t[base + ".scales"]
            return QuantizedWeight8bit(order(w.T), order(s))
        ws = np.stack([t[f"{b}.weight"].T for b in experts])
        ss = np.stack([t[f"{b}.scales"] for b in experts])
        return QuantizedWeight8bit(order(ws), order(ss))

    leaves = [
        order(t["model.embed_tokens.weight"].astype(np.float32)),
        t["model.norm.scale"].astype(np.float32),
    ]
    for layer in sorted(range(L), key=lambda i: f"decoder_layer_{i}"):
        p = f"model.layers.{layer}"
        ex = lambda name: [f"{p}.moe_block.experts.{e}.{name}" for e in range(E)]
        leaves += [
            qw(None, ex("linear")),
            qw(None, ex("linear_1")),
            qw(None, ex("linear_v")),
            qw(f"{p}.attn.k_proj"),
            qw(f"{p}.attn.o_proj"),
            qw(f"{p}.attn.q_proj"),
            qw(f"{p}.attn.v_proj"),
            t[f"{p}.pre_attn_norm.scale"].astype(np.float32),
            t[f"{p}.post_attn_norm.scale"].astype(np.float32),
            t[f"{p}.pre_moe_norm.scale"].astype(np.float32),
            t[f"{p}.post_moe_norm.scale"].astype(np.float32),
            order(t[f"{p}.moe_block.gate.weight"].astype(np.float32).T),
        ]
    for i, leaf in enumerate(leaves):
        with open(os.path.join(dst, f"tensor{i:05d}_000"), "wb") as f:
            pickle.dump(leaf, f)
    print(f"wrote {len(leaves)} tensors to {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], fortran="--fortran" in sys.argv[3:])
