#!/usr/bin/env python3
"""Structure-aware mutation run over real checkpoints (see docs/fuzzing.md).

usage: mutate_inputs.py --prismaquant BIN --shared DIR [--out DIR] [--timeout S] [--memory-gb G]
                        [--only SUBSTRING]

Copies ../shared/models/qwen3-dense-tiny and stories260K to a temporary directory and derives
hundreds of cases from them, each a checkpoint directory in which one file is mutated at the level
of its structure: config.json fields (deleted, wrong type, negative, zero, huge, fractional,
nested, inconsistent with the tensors), tokenizer.json and tokenizer_config.json entries (ids out
of range, duplicate, unknown merges, wrong types, missing parts, hostile regexes, huge strings) and
the safetensors header (dtype, shape, offsets, header length, missing and extra tensors, shapes
against the config). Every case goes through `prismaquant inspect`, `eval` (two windows of 32
tokens) and `generate` (4 tokens), each under a time limit and an address-space limit, and each
run is classified:

  ok              exit 0
  clean-error     exit 1 with a one-line "prismaquant: error: ..." message
  messy-error     exit 1 with a message spread over several lines
  internal-error  exit 2, or "internal error" on stderr
  crash           killed by a signal
  runaway         past the time limit, or out of memory (the address-space limit)

and, separately, `nonfinite` flags a run that exits 0 while printing nan or inf.
Writes OUT/results.tsv (one row per run) and OUT/flagged.txt (the output of every run that is not
ok or a clean error, or that printed nan or inf) and prints the counts; exits 1 when a run is a
crash, internal error, messy error or runaway.
"""
import argparse
import collections
import copy
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile

MODELS = ["qwen3-dense-tiny", "stories260K"]


# ---- safetensors (layout: huggingface/safetensors safetensors/src/tensor.rs) ----

def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    return header, blob[8 + length:]


def tensor_bytes(header, data):
    """name -> (entry, bytes) for every tensor, in data-offset order."""
    out = collections.OrderedDict()
    for name, entry in sorted(((n, e) for n, e in header.items() if n != "__metadata__"),
                              key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        out[name] = (dict(entry), data[begin:end])
    return out


def build_safetensors(tensors, metadata, header_text=None, length=None):
    """tensors: name -> (entry, bytes); offsets are recomputed unless header_text is given."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (entry, blob) in tensors.items():
        header[name] = dict(entry, data_offsets=[len(data), len(data) + len(blob)])
        data += blob
    text = header_text if header_text is not None else json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---- running one case ----

def limit(memory_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


NONFINITE = re.compile(r"(?<![A-Za-z])[-+]?(nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)


def classify(rc, stdout, stderr, timed_out):
    if timed_out:
        return "runaway"
    if rc < 0:
        return "crash"
    if "bad_alloc" in stderr or "cannot allocate memory" in stderr.lower():
        return "runaway"
    if rc == 2 or "internal error" in stderr:
        return "internal-error"
    if rc == 0:
        return "ok"
    lines = stderr.rstrip("\n").split("\n")
    errors = [i for i, line in enumerate(lines) if line.startswith("prismaquant: error: ")]
    if rc == 1 and len(errors) == 1 and errors[0] == len(lines) - 1:
        return "clean-error"
    return "messy-error"


def run(command, timeout, memory_bytes, env):
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, env=env,
                              preexec_fn=limit(memory_bytes))
        stdout = done.stdout.decode("utf-8", "replace")
        stderr = done.stderr.decode("utf-8", "replace")
        return classify(done.returncode, stdout, stderr, False), done.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        return "runaway", None, "", ""


# ---- the cases ----

class Case:
    def __init__(self, name, model, files):
        self.name, self.model, self.files = name, model, files  # files: name -> bytes


def dumps(value):
    return json.dumps(value, indent=2, ensure_ascii=False).encode()


HOSTILE_VALUES = [("null", None), ("string", "64"), ("list", [64]),
                  ("object", {"v": 64}), ("bool", True), ("negative", -1), ("zero", 0),
                  ("2^31", 2 ** 31), ("2^62", 2 ** 62), ("2^64", 2 ** 64), ("1e30", 1e30),
                  ("fraction", 256.5), ("nan-string", "NaN"), ("inf-string", "Infinity"),
                  ("minus-zero", -0.0), ("tiny", 1e-300)]

INTEGER_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                  "bos_token_id", "eos_token_id"]
FLOAT_FIELDS = ["rms_norm_eps", "rope_theta"]
# Fields only the runtime reads (eval and generate).
RUNTIME_FIELDS = ["hidden_act", "max_window_layers", "partial_rotary_factor"]


def config_cases(model, config):
    def case(name, value, raw=None):
        blob = raw if raw is not None else dumps(value)
        return Case(f"config/{name}", model, {"config.json": blob})

    for key in config:
        c = dict(config)
        del c[key]
        yield case(f"delete-{key}", c)
    for key in INTEGER_FIELDS + FLOAT_FIELDS + RUNTIME_FIELDS + [
            "tie_word_embeddings", "architectures", "rope_scaling", "sliding_window"]:
        for label, value in HOSTILE_VALUES:
            yield case(f"{key}={label}", dict(config, **{key: value}))
    for key, value in [("rms_norm_eps", -1.0), ("rms_norm_eps", 1e30), ("rope_theta", -10000.0),
                       ("rope_theta", 1e308), ("rope_theta", 1.0)]:
        yield case(f"{key}={value}", dict(config, **{key: value}))
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim", hidden // heads)
    layers = config["num_hidden_layers"]
    variants = {
        "head_dim-half": {"head_dim": head_dim // 2},
        "head_dim-times-heads-not-hidden": {"head_dim": head_dim * 2},
        "heads-doubled": {"num_attention_heads": heads * 2},
        "kv-heads-not-divisor": {"num_key_value_heads": 3},
        "kv-heads-over-heads": {"num_key_value_heads": heads * 2},
        "fewer-layers": {"num_hidden_layers": layers - 1},
        "more-layers": {"num_hidden_layers": layers + 1},
        "vocab-smaller": {"vocab_size": config["vocab_size"] // 2},
        "vocab-larger": {"vocab_size": config["vocab_size"] * 2},
        "untied": {"tie_word_embeddings": False},
        "max-positions-1": {"max_position_embeddings": 1},
        "max-positions-2^30": {"max_position_embeddings": 2 ** 30},
        "eos-beyond-vocab": {"eos_token_id": config["vocab_size"] + 5},
        "eos-list": {"eos_token_id": [2, config["vocab_size"] - 1]},
        "eos-list-bad": {"eos_token_id": [2, "x"]},
        "bos-negative": {"bos_token_id": -1},
        "attention-bias": {"attention_bias": True},
        "mlp-bias": {"mlp_bias": True},
        "sliding-window-1": {"sliding_window": 1, "use_sliding_window": True},
        "sliding-window-0": {"sliding_window": 0, "use_sliding_window": True},
        "sliding-window-negative": {"sliding_window": -4, "use_sliding_window": True},
        "sliding-window-max-window-layers-string": {"sliding_window": 16,
                                                    "use_sliding_window": True,
                                                    "max_window_layers": "2"},
        "moe-fields-on-dense": {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32},
        "moe-topk-over-experts": {"num_experts": 2, "num_experts_per_tok": 4,
                                  "moe_intermediate_size": 32},
        "moe-experts-2^14": {"num_experts": 2 ** 14, "num_experts_per_tok": 1,
                             "moe_intermediate_size": 1},
        "arch-unknown": {"architectures": ["GPTNeoXForCausalLM"]},
        "arch-empty": {"architectures": []},
        "arch-number": {"architectures": [7]},
        "arch-llama": {"architectures": ["LlamaForCausalLM"]},
        "arch-qwen3": {"architectures": ["Qwen3ForCausalLM"]},
        "arch-qwen3-moe": {"architectures": ["Qwen3MoeForCausalLM"]},
        "arch-mistral": {"architectures": ["MistralForCausalLM"]},
        "arch-qwen2": {"architectures": ["Qwen2ForCausalLM"]},
        "arch-huge-name": {"architectures": ["A" * 1000000]},
        "arch-newline": {"architectures": ["Llama\nForCausalLM\r\x1b[31m"]},
        "torch-dtype-odd": {"torch_dtype": "float8"},
        "hidden-2^20": {"hidden_size": 2 ** 20},
        "layers-2^14": {"num_hidden_layers": 2 ** 14},
        "intermediate-0": {"intermediate_size": 0},
    }
    rope = {
        "linear-factor-0": {"rope_type": "linear", "factor": 0.0},
        "linear-factor-negative": {"rope_type": "linear", "factor": -2.0},
        "linear-factor-huge": {"rope_type": "linear", "factor": 1e308},
        "dynamic": {"type": "dynamic", "factor": 2.0},
        "dynamic-factor-0": {"type": "dynamic", "factor": 0.0},
        "llama3-equal-freq-factors": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192},
        "llama3-original-0": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        "yarn-original-0": {"rope_type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 0},
        "yarn-beta-equal": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 1.0,
                            "beta_slow": 1.0, "original_max_position_embeddings": 256},
        "yarn-factor-0": {"rope_type": "yarn", "factor": 0.0,
                          "original_max_position_embeddings": 256},
        "yarn-attention-factor-negative": {"rope_type": "yarn", "factor": 4.0,
                                           "attention_factor": -1.0,
                                           "original_max_position_embeddings": 256},
        "yarn-mscale-string": {"rope_type": "yarn", "factor": 4.0, "mscale": "1",
                               "mscale_all_dim": 1.0, "original_max_position_embeddings": 256},
        "yarn-truncate-number": {"rope_type": "yarn", "factor": 4.0, "truncate": 0,
                                 "original_max_position_embeddings": 256},
        "unknown-type": {"rope_type": "longrope", "factor": 2.0},
        "type-number": {"rope_type": 3},
        "factor-string": {"rope_type": "linear", "factor": "2"},
    }
    for name, change in variants.items():
        yield case(name, dict(config, **change))
    for name, scaling in rope.items():
        yield case(f"rope-{name}", dict(config, rope_scaling=scaling))
    text = dumps(config)
    deep = b'{"a":' * 100000 + b"1" + b"}" * 100000
    raw = {
        "empty-file": b"",
        "not-json": b"hidden_size = 64\n",
        "truncated": text[: len(text) // 2],
        "array": b"[" + text + b"]",
        "deep-nesting": text[:-2] + b',"deep":' + deep + b"}",
        "deep-nesting-array": b"[" * 200000 + b"]" * 200000,
        "duplicate-key": text[:-2] + b',"hidden_size": 1}',
        "bom": b"\xef\xbb\xbf" + text,
        "trailing-garbage": text + b"}}",
        "nul-bytes": text.replace(b'"', b'\x00', 2),
        "number-1e400": text[:-2] + b',"rope_theta_extra": 1e400}',
        "huge-string": text[:-2] + b',"note": "' + b"x" * 20000000 + b'"}',
        "invalid-utf8-key": text[:-2] + b',"\xff\xfe": 1}',
    }
    for name, blob in raw.items():
        yield case(name, None, raw=blob)


def tokenizer_cases(model, tokenizer, tokenizer_config):
    def case(name, value, raw=None, file="tokenizer.json"):
        return Case(f"tokenizer/{name}", model, {file: raw if raw is not None else dumps(value)})

    def with_model(**change):
        t = copy.deepcopy(tokenizer)
        t["model"].update(change)
        return t

    def with_vocab(edit):
        t = copy.deepcopy(tokenizer)
        edit(t["model"]["vocab"])
        return t

    vocab = tokenizer["model"]["vocab"]
    common = "\u2581the" if "\u2581the" in vocab else next(iter(vocab))
    size = max(vocab.values()) + 1
    for label, value in [("2^24", 2 ** 24), ("negative", -1), ("1e30", 1e30), ("fraction", 2.5),
                         ("string", "3"), ("null", None), ("2^31", 2 ** 31), ("2^64", 2 ** 64),
                         ("beyond-model-vocab", size + 100), ("2^24-1", 2 ** 24 - 1)]:
        yield case(f"vocab-id={label}", with_vocab(lambda v: v.__setitem__(common, value)))
    yield case("vocab-duplicate-id", with_vocab(lambda v: v.__setitem__(common, 0)))
    yield case("vocab-all-same-id",
               with_vocab(lambda v: v.update({k: 5 for k in list(v)[:100]})))
    yield case("vocab-empty", with_model(vocab={}))
    yield case("vocab-list", with_model(vocab=list(vocab)))
    yield case("vocab-missing", {**tokenizer, "model": {k: v for k, v in
                                                         tokenizer["model"].items()
                                                         if k != "vocab"}})
    yield case("vocab-huge-token", with_vocab(lambda v: v.__setitem__("x" * 5000000, size)))
    yield case("vocab-empty-token", with_vocab(lambda v: v.__setitem__("", size)))
    merges = tokenizer["model"]["merges"]
    for label, value in [("unknown-token", ["zzzq zzzr"] + merges),
                         ("no-space", ["abc"] + merges),
                         ("triple", [["a", "b", "c"]] + merges),
                         ("number", [5] + merges),
                         ("pair-numbers", [[1, 2]] + merges),
                         ("not-a-list", "a b"),
                         ("empty", []),
                         ("duplicated", merges + merges),
                         ("result-missing", ["\u2581 \u2581\u2581\u2581\u2581zz"] + merges)]:
        yield case(f"merges-{label}", with_model(merges=value))
    for key, value in [("type", "WordPiece"), ("type", 3), ("dropout", 0.5), ("dropout", "x"),
                       ("unk_token", "<nope>"), ("unk_token", 5), ("byte_fallback", "yes"),
                       ("continuing_subword_prefix", "##"), ("fuse_unk", None)]:
        yield case(f"model-{key}={value}", with_model(**{key: value}))
    yield case("model-missing", {k: v for k, v in tokenizer.items() if k != "model"})
    yield case("model-null", dict(tokenizer, model=None))
    added = tokenizer.get("added_tokens", [])
    for label, change in [("id-2^24", {"id": 2 ** 24}), ("id-negative", {"id": -5}),
                          ("id-beyond-model-vocab", {"id": size + 50}),
                          ("id-string", {"id": "1"}), ("content-empty", {"content": ""}),
                          ("content-number", {"content": 3}),
                          ("content-huge", {"content": "<" + "s" * 3000000 + ">"}),
                          ("special-string", {"special": "true"}),
                          ("single-word", {"single_word": True}),
                          ("lstrip-rstrip", {"lstrip": True, "rstrip": True}),
                          ("normalized", {"normalized": True})]:
        tokens = copy.deepcopy(added) or [{"id": 1, "content": "<s>"}]
        tokens[min(1, len(tokens) - 1)].update(change)
        yield case(f"added-{label}", dict(tokenizer, added_tokens=tokens))
    yield case("added-not-list", dict(tokenizer, added_tokens={"id": 1}))
    yield case("added-many", dict(tokenizer, added_tokens=added + [
 {"id": size + i, "content": f"<extra_{i}>", "special": True} for i in range(20000)]))
    catastrophic = {"Regex": "(a+)+$"}
    normalizers = {
        "unknown": {"type": "Lowercase"},
        "replace-bad-regex": {"type": "Replace", "pattern": {"Regex": "(unclosed"}, "content": ""},
        "replace-catastrophic": {"type": "Replace", "pattern": catastrophic, "content": "b"},
        "replace-empty-match": {"type": "Replace", "pattern": {"Regex": "x*"}, "content": "-"},
        "replace-lookbehind-K": {"type": "Replace", "pattern": {"Regex": "(?<=\\Ka)"},
                                 "content": "-"},
        "replace-grow": {"type": "Replace", "pattern": {"Regex": "."}, "content": "x" * 10000},
        "prepend-huge": {"type": "Prepend", "prepend": "\u2581" * 1000000},
        "sequence-deep": {"type": "Sequence", "normalizers": [{"type": "NFC"}] * 10000},
        "sequence-not-list": {"type": "Sequence", "normalizers": 5},
        "missing-type": {"normalizers": []},
        "nfkd": {"type": "NFKD"},
    }
    for name, node in normalizers.items():
        yield case(f"normalizer-{name}", dict(tokenizer, normalizer=node))
    pre_tokenizers = {
        "split-catastrophic": {"type": "Split", "pattern": catastrophic, "behavior": "Isolated",
                               "invert": False},
        "split-empty-regex": {"type": "Split", "pattern": {"Regex": ""}, "behavior": "Removed",
                              "invert": True},
        "split-end-anchor": {"type": "Split", "pattern": {"Regex": "$"}, "behavior": "Isolated"},
        "split-bad-behavior": {"type": "Split", "pattern": {"String": " "}, "behavior": "Twice"},
        "split-every-char": {"type": "Split", "pattern": {"Regex": "(?=.)"},
                             "behavior": "MergedWithNext"},
        "metaspace-empty": {"type": "Metaspace", "replacement": "", "prepend_scheme": "always"},
        "metaspace-two-chars": {"type": "Metaspace", "replacement": "ab"},
        "metaspace-bad-scheme": {"type": "Metaspace", "replacement": "\u2581",
                                 "prepend_scheme": "sometimes"},
        "bytelevel-prefix": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},
        "unknown": {"type": "Whitespace"},
    }
    for name, node in pre_tokenizers.items():
        yield case(f"pre_tokenizer-{name}", dict(tokenizer, pre_tokenizer=node))
    decoders = {
        "strip-huge": {"type": "Strip", "content": " ", "start": 2 ** 63, "stop": 2 ** 63},
        "strip-negative": {"type": "Strip", "content": " ", "start": -1, "stop": 0},
        "strip-two-chars": {"type": "Strip", "content": "ab", "start": 1, "stop": 0},
        "replace-catastrophic": {"type": "Replace", "pattern": catastrophic, "content": ""},
        "bytelevel": {"type": "ByteLevel"},
        "metaspace": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"},
        "unknown": {"type": "WordPiece"},
    }
    for name, node in decoders.items():
        yield case(f"decoder-{name}", dict(tokenizer, decoder=node))
    template = tokenizer.get("post_processor") or {}
    for label, ids in [("id-beyond-model-vocab", [size + 7]), ("id-2^24", [2 ** 24]),
                       ("id-negative", [-1]), ("ids-empty", []), ("ids-many", [1] * 100000)]:
        processor = copy.deepcopy(template)
        processor.setdefault("special_tokens", {}).setdefault("<s>", {"id": "<s>"})["ids"] = ids
        yield case(f"post_processor-{label}", dict(tokenizer, post_processor=processor))
    yield case("post_processor-undefined-token", dict(tokenizer, post_processor={
 "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<x>"}}],
 "special_tokens": {}}))
    yield case("post_processor-sequence-B", dict(tokenizer, post_processor={
 "type": "TemplateProcessing", "single": [{"Sequence": {"id": "B"}}], "special_tokens": {}}))
    text = dumps(tokenizer)
    raw = {
        "empty-file": b"",
        "truncated": text[: len(text) // 2],
        "top-level-array": b"[" + text + b"]",
        "deep-nesting": b'{"normalizer":' + b'{"a":' * 100000 + b"1" + b"}" * 100001,
        "duplicate-key": text[:-2] + b',"model": null}',
        "not-utf8": text.replace(b"<unk>", b"<\xff\xfe>", 1),
    }
    for name, blob in raw.items():
        yield case(name, None, raw=blob)
    for label, value in [("bos-missing-token", {"bos_token": "<nope>"}),
                         ("eos-number", {"eos_token": 2}),
                         ("eos-object", {"eos_token": {"content": "</s>"}}),
                         ("eos-object-bad", {"eos_token": {"content": 7}}),
                         ("bos-null", {"bos_token": None}),
                         ("eos-list", {"eos_token": ["</s>"]})]:
        yield case(f"config-{label}", dict(tokenizer_config, **value),
                   file="tokenizer_config.json")
    yield case("config-not-json", None, raw=b"{bos_token: <s>}",
               file="tokenizer_config.json")


def safetensors_cases(model, header, data):
    metadata = header.get("__metadata__")
    tensors = tensor_bytes(header, data)
    names = list(tensors)
    embed = "model.embed_tokens.weight"
    linear = next(n for n in names if n.endswith("q_proj.weight"))
    norm = next(n for n in names if n.endswith("input_layernorm.weight"))

    def case(name, blob):
        return Case(f"safetensors/{name}", model, {"model.safetensors": blob})

    def edit(name, **change):
        t = copy.deepcopy(tensors)
        entry, blob = t[name]
        t[name] = (dict(entry, **change), blob)
        return t

    def with_bytes(name, blob):
        t = copy.deepcopy(tensors)
        t[name] = (t[name][0], blob)
        return t

    out_features, in_features = tensors[linear][0]["shape"]
    for dtype in ["F32", "F16", "I16", "U8", "BOOL", "F8_E4M3", "Q4_K", "bf16", ""]:
        yield case(f"dtype-{linear}-{dtype or 'empty'}",
                   build_safetensors(edit(linear, dtype=dtype), metadata))
    # Same byte count, other meaning: a 2-byte integer Linear, an F16 norm and embedding.
    yield case("dtype-norm-F16", build_safetensors(edit(norm, dtype="F16"), metadata))
    yield case("dtype-embedding-F16", build_safetensors(edit(embed, dtype="F16"), metadata))
    for label, shape in [("transposed", [in_features, out_features]),
                         ("flat", [out_features * in_features]),
                         ("3d", [1, out_features, in_features]),
                         ("halved", [out_features // 2, in_features * 2]),
                         ("negative", [-out_features, -in_features]),
                         ("fraction", [out_features + 0.5, in_features]),
                         ("string", [str(out_features), in_features]),
                         ("huge", [2 ** 62, 4]), ("2^64", [2 ** 64, 1]), ("empty", []),
                         ("zero", [0, in_features])]:
        yield case(f"shape-{label}", build_safetensors(edit(linear, shape=shape), metadata))
    header_text = json.dumps(header).encode()
    for label, offsets in [("overlap", "overlap"), ("beyond-end", "beyond"),
                           ("backwards", "backwards"), ("huge", "huge"), ("negative", "negative"),
                           ("three", "three"), ("gap", "gap")]:
        h = copy.deepcopy(header)
        entries = sorted((n for n in h if n != "__metadata__"),
                         key=lambda n: h[n]["data_offsets"][0])
        a, b = h[entries[0]]["data_offsets"], h[entries[1]]["data_offsets"]
        if offsets == "overlap":
            h[entries[1]]["data_offsets"] = [b[0] - 2, b[1] - 2]
        elif offsets == "beyond":
            last = h[entries[-1]]["data_offsets"]
            h[entries[-1]]["data_offsets"] = [last[0] + 64, last[1] + 64]
        elif offsets == "backwards":
            h[entries[0]]["data_offsets"] = [a[1], a[0]]
        elif offsets == "huge":
            h[entries[0]]["data_offsets"] = [2 ** 64 - 2, 2 ** 64 - 1]
        elif offsets == "negative":
            h[entries[0]]["data_offsets"] = [-2, a[1]]
        elif offsets == "three":
            h[entries[0]]["data_offsets"] = [a[0], a[1], a[1]]
        else:
            h[entries[0]]["data_offsets"] = [a[0] + 2, a[1] + 2]
        text = json.dumps(h).encode()
        text += b" " * ((8 - len(text) % 8) % 8)
        yield case(f"offsets-{label}", struct.pack("<Q", len(text)) + text + data)
    padded = header_text + b" " * ((8 - len(header_text) % 8) % 8)
    for label, length in [("longer", len(padded) + 8), ("shorter", len(padded) - 8),
                          ("zero", 0), ("2^63", 2 ** 63), ("2^64-1", 2 ** 64 - 1),
                          ("100MB", 100_000_001), ("file-size", len(padded) + len(data))]:
        yield case(f"header-length-{label}",
                   struct.pack("<Q", length) + padded + data)
    yield case("truncated-data", struct.pack("<Q", len(padded)) + padded + data[:-100])
    yield case("truncated-header", struct.pack("<Q", len(padded)) + padded[:100])
    yield case("only-length", struct.pack("<Q", len(padded)))
    yield case("empty-file", b"")
    yield case("header-not-json", struct.pack("<Q", 16) + b"not json at all!" + data)
    yield case("header-array", build_safetensors({}, None, header_text=b"[]"))
    yield case("header-deep", build_safetensors({}, None,
                                                header_text=b"[" * 100000 + b"]" * 100000))
    yield case("header-duplicate-name",
               build_safetensors(tensors, metadata, header_text=header_text[:-1] + b', "'
                                 + embed.encode() + b'": {"dtype": "BF16", "shape": [1], '
                                 b'"data_offsets": [0, 2]}}'))
    yield case("metadata-not-string", build_safetensors(tensors, {"format": 5}))
    yield case("metadata-not-object", build_safetensors(tensors, ["pt"]))
    yield case("unknown-field", build_safetensors(edit(linear, extra=1), metadata))
    for name in [embed, linear, norm, names[-1]]:
        t = copy.deepcopy(tensors)
        del t[name]
        yield case(f"missing-{name}", build_safetensors(t, metadata))
    t = copy.deepcopy(tensors)
    t["model.layers.99.mlp.extra.weight"] = ({"dtype": "BF16", "shape": [4]}, b"\0" * 8)
    yield case("extra-tensor", build_safetensors(t, metadata))
    t = copy.deepcopy(tensors)
    t["lm_head.weight"] = copy.deepcopy(tensors[embed])
    yield case("extra-lm_head", build_safetensors(t, metadata))
    t = copy.deepcopy(tensors)
    t["bad\nname\x1b[31m"] = ({"dtype": "BF16", "shape": [1]}, b"\0\0")
    yield case("control-character-name", build_safetensors(t, metadata))
    t = copy.deepcopy(tensors)
    t[""] = ({"dtype": "BF16", "shape": [1]}, b"\0\0")
    yield case("empty-name", build_safetensors(t, metadata))
    t = copy.deepcopy(tensors)
    t["x" * 1000000] = ({"dtype": "BF16", "shape": [1]}, b"\0\0")
    yield case("huge-name", build_safetensors(t, metadata))
    # The embedding cut to fewer rows than the token ids the data and prompt use (with the config
    # agreeing, below, so the checkpoint is consistent and only the ids are out of range).
    hidden = tensors[embed][0]["shape"][1]
    t = copy.deepcopy(tensors)
    t[embed] = ({"dtype": "BF16", "shape": [64, hidden]}, tensors[embed][1][: 64 * hidden * 2])
    yield case("embedding-64-rows", build_safetensors(t, metadata))
    # Non-finite weights: the run must not crash (reporting them is another task).
    for label, pattern in [("nan", b"\xc0\x7f"), ("inf", b"\x80\x7f"), ("max", b"\x7f\x7f")]:
        blob = pattern * (len(tensors[norm][1]) // 2)
        yield case(f"norm-{label}", build_safetensors(with_bytes(norm, blob), metadata))
        blob = pattern * (len(tensors[linear][1]) // 2)
        yield case(f"linear-{label}", build_safetensors(with_bytes(linear, blob), metadata))


def vocab_cut_case(model, config, header, data):
    """vocab_size 64 with an embedding of 64 rows: consistent, but smaller than the ids fed in."""
    tensors = tensor_bytes(header, data)
    embed = "model.embed_tokens.weight"
    hidden = tensors[embed][0]["shape"][1]
    rows = tensors[embed][1][: 64 * hidden * 2]
    tensors[embed] = ({"dtype": "BF16", "shape": [64, hidden]}, rows)
    return Case("combined/vocab-smaller-than-tokenizer", model, {
        "config.json": dumps(dict(config, vocab_size=64)),
        "model.safetensors": build_safetensors(tensors, header.get("__metadata__"))})


def all_cases(base):
    for model in MODELS:
        directory = os.path.join(base, model)
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        header, data = read_safetensors(os.path.join(directory, "model.safetensors"))
        yield Case("baseline", model, {})
        yield from config_cases(model, config)
        yield from safetensors_cases(model, header, data)
        yield vocab_cut_case(model, config, header, data)
        tokenizer_path = os.path.join(directory, "tokenizer.json")
        if os.path.exists(tokenizer_path):
            with open(tokenizer_path) as f:
                tokenizer = json.load(f)
            with open(os.path.join(directory, "tokenizer_config.json")) as f:
                tokenizer_config = json.load(f)
            yield from tokenizer_cases(model, tokenizer, tokenizer_config)


def materialize(case, base, scratch):
    """A checkpoint directory: the case's files written, every other file linked to the copy."""
    directory = os.path.join(scratch, "model")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    source = os.path.join(base, case.model)
    for name in os.listdir(source):
        if name not in case.files:
            os.symlink(os.path.join(source, name), os.path.join(directory, name))
    for name, blob in case.files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(blob)
    return directory


def commands(binary, model_dir, model, scratch):
    if model == "stories260K":  # no tokenizer: token ids below its vocabulary of 512
        eval_input = ["--token-ids", os.path.join(scratch, "ids.txt")]
        prompt = ["--prompt-ids", "1 403 407 261 378"]
    else:
        eval_input = ["--data", os.path.join(scratch, "data.txt")]
        prompt = ["--prompt", "Once upon a time, na\u00efve caf\u00e9 \u65e5\u672c"]
    return {
        "inspect": [binary, "inspect", model_dir],
        "eval": [binary, "eval", model_dir, *eval_input, "--seqlen", "32", "--max-seqs", "2"],
        "generate": [binary, "generate", model_dir, *prompt, "-n", "4"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prismaquant", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--out", default="mutation-run")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--memory-gb", type=float, default=4)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    args = parser.parse_args()
    binary = os.path.abspath(args.prismaquant)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               OMP_WAIT_POLICY="passive")
    memory = int(args.memory_gb * 2 ** 30)
    counts = collections.Counter()
    flagged = []
    with tempfile.TemporaryDirectory(prefix="pq-mutate-") as scratch:
        base = os.path.join(scratch, "base")
        for model in MODELS:
            shutil.copytree(os.path.join(args.shared, "models", model), os.path.join(base, model))
        with open(os.path.join(args.shared, "data", "wikitext-2-test.txt"), "rb") as f:
            text = f.read(20000)
        with open(os.path.join(scratch, "data.txt"), "wb") as f:
            f.write(text.decode("utf-8", "ignore").encode())
        with open(os.path.join(scratch, "ids.txt"), "w") as f:
            f.write(" ".join(str(1 + (i * 97) % 511) for i in range(200)) + "\n")
        # Cases are generated one at a time: each holds a whole mutated checkpoint file.
        cases = (c for c in all_cases(base) if args.only in f"{c.model}/{c.name}")
        number = 0
        with open(os.path.join(args.out, "results.tsv"), "w") as results:
            results.write("model\tcase\tcommand\tclass\texit\tnonfinite\tlast stderr line\n")
            for number, case in enumerate(cases, 1):
                model_dir = materialize(case, base, scratch)
                for command, argv in commands(binary, model_dir, case.model, scratch).items():
                    outcome, rc, stdout, stderr = run(argv, args.timeout, memory, env)
                    nonfinite = outcome == "ok" and bool(NONFINITE.search(stdout + stderr))
                    counts[(command, outcome)] += 1
                    counts[("all", outcome)] += 1
                    if nonfinite:
                        counts[("all", "nonfinite")] += 1
                    last = (stderr.strip().split("\n") or [""])[-1][:300]
                    results.write(f"{case.model}\t{case.name}\t{command}\t{outcome}\t{rc}\t"
                                  f"{int(nonfinite)}\t{last}\n")
                    results.flush()
                    if outcome not in ("ok", "clean-error") or nonfinite:
                        flagged.append((case.model, case.name, command, outcome, rc,
                                        "nonfinite" if nonfinite else "",
                                        stdout[-1000:] + stderr[-2000:]))
                print(f"\r{number} cases", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"{number} cases x 3 commands")
    for command in ["inspect", "eval", "generate", "all"]:
        row = ", ".join(f"{outcome} {counts[(command, outcome)]}"
                        for outcome in ["ok", "clean-error", "messy-error", "internal-error",
                                        "crash", "runaway", "nonfinite"]
                        if counts[(command, outcome)] or outcome != "nonfinite")
        print(f"  {command}: {row}")
    with open(os.path.join(args.out, "flagged.txt"), "w") as f:
        for model, name, command, outcome, rc, note, output in flagged:
            f.write(f"== {model} {name} {command}: {outcome} (exit {rc}) {note}\n{output}\n")
    bad = sum(counts[("all", o)] for o in ["messy-error", "internal-error", "crash", "runaway"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
