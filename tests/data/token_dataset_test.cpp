#include "data/token_dataset.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "common/error.h"
#include "common/file_util.h"
#include "data/splitmix64.h"
#include "support/test_support.h"

namespace pq::data {
namespace {

using ::testing::HasSubstr;

std::vector<std::int32_t> iota_tokens(std::size_t count) {
  std::vector<std::int32_t> tokens(count);
  std::iota(tokens.begin(), tokens.end(), 0);
  return tokens;
}

// Expects `body` to throw a pq::Error whose message contains every fragment.
template <typename Body>
void expect_error(Body body, std::initializer_list<std::string> fragments) {
  try {
    body();
    ADD_FAILURE() << "no pq::Error thrown";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    for (const std::string& fragment : fragments) EXPECT_THAT(message, HasSubstr(fragment));
  }
}

TEST(SplitMix64, MatchesPublishedReferenceSequence) {
  // The published outputs for seed 1234567 (Rosetta Code, "Pseudo-random numbers/Splitmix64").
  SplitMix64 random(1234567);
  EXPECT_EQ(random.next(), 6457827717110365317ULL);
  EXPECT_EQ(random.next(), 3203168211198807973ULL);
  EXPECT_EQ(random.next(), 9817491932198370423ULL);
  SplitMix64 bounded(5);
  for (int i = 0; i < 1000; ++i) EXPECT_LT(bounded.below(7), 7u);
}

TEST(TokenDataset, SplitsAreDisjointAndShapesAreRight) {
  const auto dataset = TokenDataset::from_tokens(iota_tokens(1000), 0.1);
  EXPECT_EQ(dataset.calibration_tokens().size(), 900u);
  EXPECT_EQ(dataset.heldout_tokens().size(), 100u);
  // Every token id occurs once, so shared ids would mean shared positions.
  const auto calibration = dataset.calibration(56, 16, 1);
  const auto heldout = dataset.heldout(6, 16);
  ASSERT_EQ(calibration.size(), 56u);
  ASSERT_EQ(heldout.size(), 6u);
  std::set<std::int32_t> calibration_ids;
  for (const auto& sequence : calibration) {
    ASSERT_EQ(sequence.size(), 16u);
    // A window is 16 consecutive tokens starting at a multiple of 16.
    EXPECT_EQ(sequence.front() % 16, 0);
    for (std::size_t i = 1; i < sequence.size(); ++i) EXPECT_EQ(sequence[i], sequence[i - 1] + 1);
    calibration_ids.insert(sequence.begin(), sequence.end());
  }
  EXPECT_EQ(calibration_ids.size(), 56u * 16u);  // all windows distinct
  EXPECT_LT(*calibration_ids.rbegin(), 900);
  for (std::size_t i = 0; i < heldout.size(); ++i) {
    ASSERT_EQ(heldout[i].size(), 16u);
    EXPECT_EQ(heldout[i].front(), static_cast<std::int32_t>(900 + 16 * i));
    for (const std::int32_t id : heldout[i]) EXPECT_EQ(calibration_ids.count(id), 0u);
  }
  expect_error([&] { dataset.calibration(57, 16, 1); }, {"room for 56 sequences", "57"});
  expect_error([&] { dataset.heldout(7, 16); }, {"room for 6 sequences"});
}

TEST(TokenDataset, SamplingIsDeterministicGivenTheSeed) {
  const auto dataset = TokenDataset::from_tokens(iota_tokens(1000), 0.1);
  EXPECT_EQ(dataset.calibration(5, 16, 42), dataset.calibration(5, 16, 42));
  EXPECT_NE(dataset.calibration(5, 16, 42), dataset.calibration(5, 16, 43));
  // Window starts computed by an independent Python implementation of the documented rule
  // (SplitMix64(42), partial Fisher-Yates over the 56 windows of 16 tokens, rejection sampling).
  std::vector<std::int32_t> starts;
  for (const auto& sequence : dataset.calibration(5, 16, 42)) starts.push_back(sequence.front());
  EXPECT_EQ(starts, (std::vector<std::int32_t>{80, 272, 320, 880, 800}));
}

TEST(TokenDataset, HeldoutFractionBounds) {
  EXPECT_EQ(TokenDataset::from_tokens(iota_tokens(10), 0.0).heldout_tokens().size(), 0u);
  EXPECT_EQ(TokenDataset::from_tokens(iota_tokens(10), 1.0).calibration_tokens().size(), 0u);
  EXPECT_EQ(TokenDataset::from_tokens(iota_tokens(10), 0.25).heldout_tokens().size(), 2u);
  expect_error([] { TokenDataset::from_tokens(iota_tokens(10), 1.5); }, {"1.5"});
}

TEST(ReadDocuments, ParsesTextAndChatJsonl) {
  test::TempDir dir;
  const auto path = dir / "data.jsonl";
  write_text_file_atomic(path,
                         "{\"text\": \"first document\"}\n"
                         "\n"
                         "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"},"
                         " {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\r\n"
                         "{\"text\": \"caf\\u00e9\", \"id\": 3}\n");
  EXPECT_EQ(
      read_documents(path, TextFormat::kAuto),
      (std::vector<std::string>{"first document", "user: Hi\nassistant: Hello!\n", "caf\xC3\xA9"}));
}

TEST(ReadDocuments, JsonlErrorsNameFileAndLine) {
  test::TempDir dir;
  const auto path = dir / "bad.jsonl";
  const auto check = [&](const std::string& content, std::initializer_list<std::string> fragments) {
    write_text_file_atomic(path, content);
    expect_error([&] { read_documents(path, TextFormat::kAuto); }, fragments);
  };
  const std::string good = "{\"text\": \"ok\"}\n";
  check(good + good + "{\"text\": \"unterminated}\n",
        {path.string() + ":3 is not valid JSON (syntax error at byte"});
  check(good + "[1, 2]\n", {path.string() + ":2:", "object"});
  check(good + "{\"prompt\": \"x\"}\n", {path.string() + ":2:", "\"text\""});
  check("{\"text\": 5}\n", {path.string() + ":1:", "not a string"});
  check(good + good + good + "{\"messages\": [{\"role\": \"user\"}]}\n",
        {path.string() + ":4:", "message 0"});
  check("{\"messages\": {\"role\": \"user\"}}\n", {path.string() + ":1:", "not an array"});
  check("\n  \n", {path.string(), "no text"});
}

TEST(ReadDocuments, PlainTextIsOneDocumentWithLfLineEnds) {
  test::TempDir dir;
  const auto path = dir / "corpus.txt";
  write_text_file_atomic(path, "line one\r\nline two\r\n");
  EXPECT_EQ(read_documents(path, TextFormat::kAuto),
            (std::vector<std::string>{"line one\nline two\n"}));
  write_text_file_atomic(path, "fine\nfine\nbad \xFF byte\n");
  expect_error([&] { read_documents(path, TextFormat::kPlainText); },
               {path.string() + ":3:", "UTF-8"});
}

TEST(TokenDataset, ReadsTokenIdFiles) {
  test::TempDir dir;
  const auto path = dir / "ids.txt";
  write_text_file_atomic(path, "1 2\t3\n4\n\n  5 6 7 8 9 10\n");
  const auto dataset = TokenDataset::from_token_id_file(path, 11, 0.2);
  EXPECT_EQ(std::vector<std::int32_t>(dataset.tokens().begin(), dataset.tokens().end()),
            (std::vector<std::int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(dataset.heldout(1, 2), (std::vector<std::vector<std::int32_t>>{{9, 10}}));
  expect_error([&] { TokenDataset::from_token_id_file(path, 10); },
               {path.string() + ":4:", "10", "vocabulary size 10"});
  write_text_file_atomic(path, "1 2\n3 x4\n");
  expect_error([&] { TokenDataset::from_token_id_file(path); }, {path.string() + ":2:", "'x4'"});
  write_text_file_atomic(path, "-1\n");
  expect_error([&] { TokenDataset::from_token_id_file(path); }, {path.string() + ":1:", "'-1'"});
  write_text_file_atomic(path, "99999999999\n");
  expect_error([&] { TokenDataset::from_token_id_file(path); }, {"99999999999"});
  write_text_file_atomic(path, " \n");
  expect_error([&] { TokenDataset::from_token_id_file(path); }, {"no token ids"});
}

// Tokenizing the wikitext file reproduces the reference perplexity ids (BOS + Llama-2 ids of the
// LF-normalized text) of the qwen3-dense-tiny logits fixture.
TEST(TokenDataset, WikitextTokensMatchReferencePerplexityIds) {
  PQ_REQUIRE_SHARED();
  const auto tokenizer =
      tokenizer::Tokenizer::load(test::shared_dir() / "models/qwen3-dense-tiny/tokenizer.json");
  const auto dataset = TokenDataset::from_text_file(test::shared_dir() / "data/wikitext-2-test.txt",
                                                    tokenizer, TextFormat::kAuto, 0.1);
  const auto fixture = nlohmann::json::parse(
      read_text_file(test::shared_dir() / "fixtures/qwen3-dense-tiny-logits.json"));
  const auto expected = fixture.at("ppl_token_ids").get<std::vector<std::int32_t>>();
  ASSERT_GT(dataset.tokens().size(), 100000u);
  EXPECT_EQ(std::vector<std::int32_t>(dataset.tokens().begin(),
                                      dataset.tokens().begin() + expected.size()),
            expected);
  // One document: BOS first, EOS last.
  EXPECT_EQ(dataset.tokens().back(), tokenizer.eos_id());
  const auto sequences = dataset.calibration(128, 512, 0);
  EXPECT_EQ(sequences.size(), 128u);
  EXPECT_EQ(dataset.heldout(16, 512).size(), 16u);
}

TEST(TokenDataset, JsonlDocumentsAreEncodedWithSpecialTokensAndEos) {
  PQ_REQUIRE_SHARED();
  const auto tokenizer =
      tokenizer::Tokenizer::load(test::shared_dir() / "models/qwen3-dense-tiny/tokenizer.json");
  test::TempDir dir;
  const auto path = dir / "chat.jsonl";
  write_text_file_atomic(path,
                         "{\"text\": \"Hello world\"}\n"
                         "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n");
  const auto dataset = TokenDataset::from_text_file(path, tokenizer);
  std::vector<std::int32_t> expected = tokenizer.encode("Hello world", true);
  expected.push_back(*tokenizer.eos_id());
  const auto chat = tokenizer.encode("user: Hi\n", true);
  expected.insert(expected.end(), chat.begin(), chat.end());
  expected.push_back(*tokenizer.eos_id());
  EXPECT_EQ(std::vector<std::int32_t>(dataset.tokens().begin(), dataset.tokens().end()), expected);
  EXPECT_EQ(expected.front(), *tokenizer.bos_id());
}

}  // namespace
}  // namespace pq::data
