#!/usr/bin/env python3
"""Write a GGUF file of a Grok-architecture checkpoint, for benchmarking against llama.cpp.

Usage:
  pip install gguf sentencepiece numpy
  scripts/gguf-from-checkpoint.py --model models/small-bf16 \
      --tokenizer ../shared/models/grok-1/tokenizer.model --type f16 --out /tmp/small-f16.gguf
  scripts/gguf-from-checkpoint.py ... --type q8_0 --out /tmp/small-q8_0.gguf

Reads a single-file bf16/f32 safetensors checkpoint with the tensor names `grokctl gen-model`
writes (`model.layers.N.attn.q_proj.weight`, `...moe_block.experts.X.linear.weight`, ...) and
writes llama.cpp's `grok` architecture: experts stacked per layer, the tied embedding used as the
output matrix. `--type q8_0` quantizes every matrix but the embedding (kept f16, as the int8
checkpoints of this project keep it in bf16), so both sides read the same bytes per token.
The router and the norms stay f32. Used by `scripts/bench-llamacpp.sh`.
"""
import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = data[start:end]
        if meta["dtype"] == "BF16":
            bits = raw.view(np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif meta["dtype"] == "F32":
            arr = raw.view(np.float32)
        else:
            sys.exit(f"{name}: dtype {meta['dtype']} is not supported (bf16 or f32 checkpoints only)")
        tensors[name] = arr.reshape(meta["shape"])
    return tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors)")
    ap.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model with the checkpoint's vocabulary")
    ap.add_argument("--type", choices=["f16", "q8_0"], default="f16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import gguf
    import sentencepiece as spm

    model = Path(args.model)
    cfg = json.loads((model / "config.json").read_text())
    files = sorted(model.glob("*.safetensors"))
    if len(files) != 1:
        sys.exit(f"{model}: expected one .safetensors file, found {len(files)}")
    t = read_safetensors(files[0])

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    if sp.vocab_size() != cfg["vocab_size"]:
        sys.exit(f"tokenizer has {sp.vocab_size()} pieces, the checkpoint {cfg['vocab_size']}")

    n_layer = cfg["num_hidden_layers"]
    n_expert = cfg["num_experts"]
    d = cfg["hidden_size"]
    head_dim = cfg["head_dim"]

    w = gguf.GGUFWriter(args.out, "grok")
    w.add_name(model.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(n_expert)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_attn_logit_softcapping(cfg["max_attn_value"])
    w.add_router_logit_softcapping(cfg["max_attn_value"])
    w.add_attn_output_scale(cfg["attn_output_multiplier"])
    w.add_embedding_scale(cfg["embedding_multiplier_scale"])
    w.add_logit_scale(cfg["output_multiplier_scale"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)

    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])

    def matrix(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if args.type == "q8_0" and name != "token_embd.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr.astype(np.float16))

    def vector(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    matrix("token_embd.weight", t["model.embed_tokens.weight"])
    vector("output_norm.weight", t["model.norm.scale"])
    for i in range(n_layer):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", t[p + "pre_attn_norm.scale"])
        vector(b + "attn_output_norm.weight", t[p + "post_attn_norm.scale"])
        vector(b + "ffn_norm.weight", t[p + "pre_moe_norm.scale"])
        vector(b + "layer_output_norm.weight", t[p + "post_moe_norm.scale"])
        matrix(b + "attn_q.weight", t[p + "attn.q_proj.weight"])
        matrix(b + "attn_k.weight", t[p + "attn.k_proj.weight"])
        matrix(b + "attn_v.weight", t[p + "attn.v_proj.weight"])
        matrix(b + "attn_output.weight", t[p + "attn.o_proj.weight"])
        vector(b + "ffn_gate_inp.weight", t[p + "moe_block.gate.weight"])
        # Grok's expert: linear_1(gelu(linear(x)) * linear_v(x)), so linear is llama.cpp's
        # gate, linear_v its up and linear_1 its down projection.
        for ours, theirs in (("linear", "ffn_gate_exps"), ("linear_v", "ffn_up_exps"), ("linear_1", "ffn_down_exps")):
            stacked = np.stack([t[f"{p}moe_block.experts.{x}.{ours}.weight"] for x in range(n_expert)])
            matrix(b + theirs + ".weight", stacked)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
