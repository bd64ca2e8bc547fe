#!/usr/bin/env python3
"""Writes small valid seed inputs for the safetensors fuzzers (see docs/fuzzing.md).

usage: make_seeds.py HEADER_CORPUS_DIR INDEX_CORPUS_DIR
The layout follows the reference serializer (huggingface/safetensors safetensors/src/tensor.rs):
u64 little-endian header length, compact JSON padded with spaces to a multiple of 8, data.
"""
import json
import os
import struct
import sys

SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
         "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors(tensors, metadata=None):
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        count = 1
        for dim in shape:
            count *= dim
        size = count * SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += bytes((i * 37 + 11) % 256 for i in range(size))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def main():
    header_dir, index_dir = sys.argv[1], sys.argv[2]
    os.makedirs(header_dir, exist_ok=True)
    os.makedirs(index_dir, exist_ok=True)
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
        with open(os.path.join(header_dir, name), "wb") as f:
            f.write(blob)
    index = {"metadata": {"total_size": 48},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    with open(os.path.join(index_dir, "index"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(index_dir, "minimal"), "w") as f:
        json.dump({"weight_map": {"x": "model.safetensors"}}, f)


if __name__ == "__main__":
    main()
