#!/usr/bin/env python3
"""Writes seed inputs for every fuzz target (see docs/fuzzing.md).

usage: make_seeds.py OUT_DIR [--shared DIR] [--work DIR]

OUT_DIR/<target>/ gets small valid inputs for target fuzz_<target>: synthetic ones written here,
plus, with --shared (the shared test material, ../shared), the tiny models' config.json and
shrunk copies of their tokenizer.json and a wikitext excerpt, and, with --work (a work directory
that `prismaquant probe`, `cost` and `allocate` wrote), its cost.json, assignment.json and
probe.json.

The safetensors layout follows the reference serializer (huggingface/safetensors
safetensors/src/tensor.rs): u64 little-endian header length, compact JSON padded with spaces to a
multiple of 8, data.
"""
import argparse
import json
import os
import struct

SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
         "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
PACK = {"F64": "d", "I64": "q", "F32": "f"}


def safetensors(tensors, metadata=None):
    """tensors: (name, dtype, shape) with patterned bytes, or (name, dtype, shape, values)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, *values in tensors:
        count = 1
        for dim in shape:
            count *= dim
        size = count * SIZES[dtype]
        if values:
            blob = struct.pack("<%d%s" % (count, PACK[dtype]), *values[0])
        else:
            blob = bytes((i * 37 + 11) % 256 for i in range(size))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def write(directory, name, content):
    os.makedirs(directory, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    with open(os.path.join(directory, name), "wb") as f:
        f.write(content)


def safetensors_seeds(out):
    header_dir = os.path.join(out, "safetensors_header")
    seeds = {
        "empty": safetensors([]),
        "metadata": safetensors([], {"format": "pt"}),
        "one_f32": safetensors([("w", "F32", [2, 3])], {"format": "pt"}),
        "scalar_and_empty": safetensors([("s", "BF16", []), ("z", "F16", [0, 4])]),
        "every_dtype": safetensors([(f"t.{d}", d, [3]) for d in SIZES]),
        "linear": safetensors([("model.layers.0.mlp.down_proj.weight_packed", "U8", [4, 8]),
                               ("model.layers.0.mlp.down_proj.weight_scale", "F8_E4M3", [4, 1]),
                               ("model.layers.0.mlp.down_proj.weight_global_scale", "F32", [1])]),
    }
    for name, blob in seeds.items():
        write(header_dir, name, blob)
    index_dir = os.path.join(out, "safetensors_index")
    index = {"metadata": {"total_size": 48},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    write(index_dir, "index", json.dumps(index, indent=2, sort_keys=True))
    write(index_dir, "minimal", json.dumps({"weight_map": {"x": "model.safetensors"}}))


# ---- config.json ----

def config_seeds(out, shared):
    directory = os.path.join(out, "config")
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
             "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 8, "vocab_size": 512,
             "max_position_embeddings": 512, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
             "rope_scaling": None, "tie_word_embeddings": True, "bos_token_id": 1,
             "eos_token_id": 2, "torch_dtype": "bfloat16"}
    # rope_scaling as transformers spells it (modeling_rope_utils.py).
    llama3 = dict(llama, tie_word_embeddings=False, mlp_bias=True, attention_bias=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  eos_token_id=[2, 3])
    mistral = dict(llama, architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=4096, rope_scaling={"type": "linear", "factor": 2.0})
    qwen2 = dict(llama, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                 use_sliding_window=False, sliding_window=32768,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 32768})
    qwen3 = dict(llama, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16)
    qwen3_moe = dict(qwen3, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                     norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0])
    for name, config in [("llama", llama), ("llama3", llama3), ("mistral", mistral),
                         ("qwen2", qwen2), ("qwen3", qwen3), ("qwen3_moe", qwen3_moe)]:
        write(directory, name, json.dumps(config, indent=2))
    if shared:
        models = os.path.join(shared, "models")
        for model in sorted(os.listdir(models)):
            path = os.path.join(models, model, "config.json")
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    write(directory, "shared-" + model, f.read())


# ---- tokenizer.json ----

def bytes_to_unicode():
    """GPT-2's byte-to-character table (openai/gpt-2 src/encoder.py bytes_to_unicode)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Qwen2/Qwen3's pre-tokenizer pattern (Qwen/Qwen2.5-0.5B tokenizer.json, pre_tokenizer Split).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_tokenizer():
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = []
    for left, right in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "w"),
                        ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld")]:
        vocab.setdefault(left + right, len(vocab))
        merges.append([left, right])
    return {
        "version": "1.0",
        "added_tokens": [
            {"id": 300, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True},
            {"id": 301, "content": "<think>", "single_word": False, "lstrip": False,
             "rstrip": True, "normalized": False, "special": False}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                  "merges": merges},
    }


def shrink(tokenizer, keep_ids):
    """The tokenizer with its vocabulary cut to ids below keep_ids and the merges still valid."""
    model = tokenizer["model"]
    vocab = {token: i for token, i in model["vocab"].items() if i < keep_ids}
    merges = []
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    return dict(tokenizer, model=dict(model, vocab=vocab, merges=merges))


def tokenizer_seeds(out, shared):
    directory = os.path.join(out, "tokenizer")
    write(directory, "byte_level", json.dumps(byte_level_tokenizer(), ensure_ascii=False))
    if not shared:
        return
    with open(os.path.join(shared, "models", "qwen3-dense-tiny", "tokenizer.json")) as f:
        sentencepiece = shrink(json.load(f), 600)
    write(directory, "sentencepiece", json.dumps(sentencepiece, ensure_ascii=False))
    # The same vocabulary with the Metaspace pre-tokenizer and decoder of tokenizers >= 0.19
    # (pre_tokenizers/metaspace.rs) instead of the Prepend/Replace normalizer.
    metaspace = dict(sentencepiece, normalizer=None,
                     pre_tokenizer={"type": "Metaspace", "replacement": "▁",
                                    "prepend_scheme": "first", "split": False},
                     decoder={"type": "Metaspace", "replacement": "▁",
                              "prepend_scheme": "first", "split": False})
    write(directory, "metaspace", json.dumps(metaspace, ensure_ascii=False))


# ---- calibration data ----

def token_dataset_seeds(out, shared):
    directory = os.path.join(out, "token_dataset")
    write(directory, "text", "The quick brown fox.\r\nJumps over the lazy dog.\n")
    write(directory, "jsonl", "\n".join([
        json.dumps({"text": "A first document."}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello! \u00e9\u65e5"}]}),
        json.dumps({"text": "Last one"})]) + "\n")
    write(directory, "token_ids", " ".join(str((i * 37) % 1000) for i in range(200)) + "\n")
    if shared:
        with open(os.path.join(shared, "data", "wikitext-2-test.txt"), "rb") as f:
            write(directory, "wikitext", f.read(2000).decode("utf-8", "ignore"))


# ---- stage artifacts (fuzz_artifacts: first byte selects the reader) ----

COST, ASSIGNMENT, PROBE_RESULT, PROBE_PART = b"\x00", b"\x01", b"\x02", b"\x03"

# The fixed spec of fuzz_artifacts.cpp: a one-layer Llama, hidden 8, 2 heads of 4, 1 KV head, MLP
# 8. Candidate Linears in spec order with their input keys (src/probe/input_key.cpp) and shapes.
LAYER = "model.layers.0."
PART_LINEARS = [
    (LAYER + "self_attn.q_proj", LAYER + "self_attn.qkv_proj", [8, 8]),
    (LAYER + "self_attn.k_proj", LAYER + "self_attn.qkv_proj", [4, 8]),
    (LAYER + "self_attn.v_proj", LAYER + "self_attn.qkv_proj", [4, 8]),
    (LAYER + "self_attn.o_proj", LAYER + "self_attn.o_proj", [8, 8]),
    (LAYER + "mlp.gate_proj", LAYER + "mlp.gate_up_proj", [8, 8]),
    (LAYER + "mlp.up_proj", LAYER + "mlp.gate_up_proj", [8, 8]),
    (LAYER + "mlp.down_proj", LAYER + "mlp.down_proj", [8, 8]),
]
PART_INPUTS = [LAYER + "self_attn.qkv_proj", LAYER + "self_attn.o_proj",
               LAYER + "mlp.gate_up_proj", LAYER + "mlp.down_proj"]


def probe_part(routing):
    """A part file as ProbeAccumulator::save writes it, plus the act_second_moment tensors the
    probe adds (src/probe/probe_stage.cpp write_part)."""
    n, k = len(PART_LINEARS), len(PART_INPUTS)
    tensors = [("fisher_sums", "F64", [n], [0.5 + i for i in range(n)]),
               ("linear_tokens", "I64", [n], [64] * n)]
    for key in PART_INPUTS:
        tensors.append(("hessian." + key, "F32", [8, 8],
                        [float(8 - abs(i // 8 - i % 8)) for i in range(64)]))
        tensors.append(("act_second_moment." + key, "F32", [8], [0.125] * 8))
    tensors += [("input_tokens", "I64", [k], [64] * k), ("input_amax", "F32", [k], [3.5] * k),
                ("sequences", "I64", [1], [4])]
    if routing:
        tensors += [("routing_header.0", "I64", [2], [2, 64]),
                    ("route_counts.0", "I64", [4], [40, 30, 50, 8]),
                    ("route_probability_sums.0", "F64", [4], [16.0, 12.0, 30.0, 6.0])]
    return safetensors(tensors)


def probe_json(moe):
    """probe.json for the fixed spec (docs/probe-artifacts.md, prismaquant.probe/2)."""
    return {
        "schema": "prismaquant.probe/2", "model": "fuzz", "fingerprint": "0123456789abcdef",
        "calibration": {"data": "data.txt", "sequences": 4, "seqlen": 16, "seed": 42,
                        "importance_weighting": True, "batch_size": 4},
        "files": ["probe.layer-0000.safetensors"],
        "linears": [{"name": name, "shape": shape, "input_key": key, "fisher_trace": 0.25,
                     "tokens": 64, "act_second_moment": {"mean": 0.125, "min": 0.125, "max": 0.125}}
                    for name, key, shape in PART_LINEARS],
        "inputs": [{"key": key, "in_features": 8, "tokens": 64, "amax": 3.5}
                   for key in PART_INPUTS],
        "moe": moe,
    }


def artifact_seeds(out, work):
    directory = os.path.join(out, "artifacts")
    write(directory, "probe_part", PROBE_PART + probe_part(False))
    write(directory, "probe_part_routing", PROBE_PART + probe_part(True))
    moe = [{"layer": 0, "top_k": 2, "tokens": 64, "route_counts": [40, 30, 50, 8],
            "mean_probability": [0.25, 0.1875, 0.46875, 0.09375]}]
    for name, routing in [("probe_result", []), ("probe_result_moe", moe)]:
        write(directory, name, PROBE_RESULT + json.dumps(probe_json(routing), indent=1).encode()
              + b"\x00" + probe_part(bool(routing)))
    if not work:
        return
    for name, prefix, path in [("cost", COST, "cost/cost.json"),
                               ("assignment", ASSIGNMENT, "alloc/assignment.json"),
                               ("probe_result_real", PROBE_RESULT, "probe/probe.json")]:
        with open(os.path.join(work, path), "rb") as f:
            # The real probe.json meets the synthetic part: its JSON paths are reached, then its
            # Hessian sizes disagree with the part's.
            tail = b"\x00" + probe_part(False) if prefix == PROBE_RESULT else b""
            write(directory, name, prefix + f.read() + tail)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--shared", help="the shared test material (models/, data/)")
    parser.add_argument("--work", help="a work directory with probe/, cost/ and alloc/")
    args = parser.parse_args()
    safetensors_seeds(args.out)
    config_seeds(args.out, args.shared)
    tokenizer_seeds(args.out, args.shared)
    token_dataset_seeds(args.out, args.shared)
    artifact_seeds(args.out, args.work)


if __name__ == "__main__":
    main()
