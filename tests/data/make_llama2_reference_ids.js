// Makes tests/data/llama2-reference-ids.json: Llama-2 token ids from an implementation independent
// of prismaquant. Run from a scratch directory (never commit node_modules):
//   npm install @lenml/tokenizers@3.7.2
//   node make_llama2_reference_ids.js /path/to/shared > llama2-reference-ids.json
// legacy=true keeps the tokenizer.json normalizer (Prepend + Replace "▁", applied to each piece
// between added tokens, as the Rust tokenizers library does); transformers.js otherwise swaps it
// for a Metaspace "first" pre-tokenizer, which differs on text next to special tokens.
const fs = require("fs");
const { TokenizerLoader } = require("@lenml/tokenizers");

const shared = process.argv[2];
const tokenizerJSON = JSON.parse(fs.readFileSync(shared + "/tokenizers/llama2/tokenizer.json"));
const tokenizerConfig = JSON.parse(
  fs.readFileSync(shared + "/tokenizers/llama2/tokenizer_config.json"));
tokenizerConfig.legacy = true;
const tokenizer = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

const fixture = JSON.parse(fs.readFileSync(shared + "/fixtures/tokenizer-reference-ids.json"));
const texts = fixture.models.qwen3.slice(0, 67).map((c) => c.text);
texts.push(
  " ", "   ", "\t", "\n", "Hello  world", "  two leading", "trailing  ", "日本語のテキスト",
  "\u{1F916} robot", "<s>Hello</s>", "a <s> b", "<unk>", "<0x0A> literal", "naïve café",
  "ﬁ ligature", "x\u0000y", "Tabs\tand\r\nCRLF", "1234567890", "don't", "Ωμέγα", "العربية");
const cases = texts.map((text) => ({ text, ids: tokenizer.encode(text, { add_special_tokens: false }) }));
process.stdout.write(JSON.stringify({
  description: "Llama-2 SentencePiece-style BPE token ids (add_special_tokens=false) for " +
    "../shared/tokenizers/llama2/tokenizer.json, made by tests/data/make_llama2_reference_ids.js " +
    "with @lenml/tokenizers 3.7.2 (transformers.js port), legacy=true. Texts: the first 67 cases " +
    "of ../shared/fixtures/tokenizer-reference-ids.json and 21 extra strings.",
  cases,
}) + "\n");
