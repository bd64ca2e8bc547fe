// Makes tests/data/byte-level-stress-ids.json: Qwen3 and Llama-3 token ids, from an implementation
// independent of prismaquant, for 400 pseudo-random strings built from code points that stress
// the pre-tokenizer regex (Unicode spaces, apostrophes, marks, digits of other scripts, emoji,
// added tokens). Run from a scratch directory (never commit node_modules):
//   npm install @lenml/tokenizers@3.7.2
//   node make_byte_level_stress_ids.js /path/to/shared > byte-level-stress-ids.json
// JavaScript's \s differs from the Unicode White_Space property that the tokenizers library's
// Oniguruma regexes use: it includes U+FEFF and excludes U+0085. Texts containing either are
// therefore not comparable; the test skips them.
const fs = require("fs");
const { TokenizerLoader } = require("@lenml/tokenizers");
const shared = process.argv[2];
function load(name) {
  const j = JSON.parse(fs.readFileSync(`${shared}/tokenizers/${name}/tokenizer.json`));
  const c = JSON.parse(fs.readFileSync(`${shared}/tokenizers/${name}/tokenizer_config.json`));
  return TokenizerLoader.fromPreTrained({ tokenizerJSON: j, tokenizerConfig: c });
}
// Deterministic pseudo-random strings over a pool of tricky code points.
let state = 12345;
const rand = (n) => { state = (state * 1103515245 + 12345) % 2147483648; return state % n; };
const pool = [
  " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2009", "\u3000", "\u0085", "\u200b", "\u2028", "\u000b", "\u000c",
  "a", "Z", "é", "e\u0301", "ß", "ſ", "İ", "ǅ", "Ω", "ж", "ש", "ع", "हि", "ก", "中", "日本", "한국", "ｱ",
  "0", "7", "123", "45678", "٣", "५", "½", "²", "Ⅻ", "𝟘",
  "'s", "'S", "'re", "'LL", "'d", "’s", "'x", "'",
  ".", ",", "!", "?", "...", "—", "-", "@-@", "\"", "(", ")", "<", ">", "$", "%", "#", "_", "\\", "/", "~",
  "🤖", "👍🏽", "🇫🇷", "\u{1F600}", "\u{10FFFD}", "\ufeff", "\u00ad", "\u0000",
  "<|im_start|>", "<|endoftext|>", "<think>", "<|begin_of_text|>", "<s>",
];
const texts = [];
for (let i = 0; i < 400; ++i) {
  let t = "";
  const n = 1 + rand(12);
  for (let k = 0; k < n; ++k) t += pool[rand(pool.length)];
  texts.push(t);
}
const out = {};
for (const name of ["qwen3", "llama3"]) {
  const tok = load(name);
  out[name] = texts.map((text) => ({ text, ids: tok.encode(text, { add_special_tokens: false }) }));
}
out.description = "Qwen3/Llama-3 token ids (add_special_tokens=false) from @lenml/tokenizers 3.7.2 for " +
  "../shared/tokenizers/{qwen3,llama3}, made by tests/data/make_byte_level_stress_ids.js.";
process.stdout.write(JSON.stringify(out) + "\n");
