#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <random>
#include <string>

#include "alloc/cost_table.h"

namespace pq::alloc::test {

// Shape of a random cost table. Sizes are drawn as multiples of `byte_multiple` so both the exact
// (gcd) and the coarse byte axis of the allocator get exercised.
struct InstanceSpec {
  std::size_t linears = 5;
  std::size_t formats = 3;
  std::size_t groups = 2;  // sibling group keys to draw from (plus "alone")
  double forbidden_probability = 0.2;
  std::uint64_t byte_multiple = 1;
  std::uint64_t max_bytes = 60;  // in multiples
  bool integer_dloss = false;    // integer dL values provoke ties
};

// A FormatCost with only the columns the allocator reads.
inline FormatCost cost(std::uint64_t bytes, double predicted_dloss) {
  FormatCost c;
  c.bytes = bytes;
  c.predicted_dloss = predicted_dloss;
  return c;
}

inline CostTable random_cost_table(const InstanceSpec& spec, std::mt19937_64& rng) {
  CostTable table;
  table.model = "random";
  for (std::size_t f = 0; f < spec.formats; ++f) table.formats.push_back(fmt::format("F{}", f));
  table.passthrough_params = rng() % 1000;
  table.passthrough_bytes = 2 * table.passthrough_params;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (std::size_t l = 0; l < spec.linears; ++l) {
    LinearCost linear;
    linear.name = fmt::format("model.layers.{}.proj", l);
    const std::int64_t out = 1 + static_cast<std::int64_t>(rng() % 64);
    const std::int64_t in = 1 + static_cast<std::int64_t>(rng() % 64);
    linear.shape = {out, in};
    linear.params = static_cast<std::uint64_t>(out * in);
    const std::size_t group = rng() % (spec.groups + 1);
    if (group < spec.groups) linear.group = fmt::format("group{}", group);
    linear.costs.resize(spec.formats);
    const std::size_t always = rng() % spec.formats;  // every Linear takes at least one format
    for (std::size_t f = 0; f < spec.formats; ++f) {
      if (f != always && unit(rng) < spec.forbidden_probability) continue;
      const std::uint64_t bytes = spec.byte_multiple * (1 + rng() % spec.max_bytes);
      const double dloss = spec.integer_dloss ? static_cast<double>(rng() % 8) : 10.0 * unit(rng);
      linear.costs[f] = cost(bytes, dloss);
    }
    table.linears.push_back(std::move(linear));
  }
  return table;
}

// A decoder-shaped table: per layer q/k/v (one sibling group), o, gate/up (one group), down, in
// MXFP4, NVFP4, MXFP8 and BF16 with the exact byte counts of ../shared/docs/method-facts.md §4
// (codes plus one 8-bit scale per group of 32 or 16) and a predicted dL that falls with bits.
inline CostTable decoder_cost_table(std::size_t layers, std::int64_t hidden, std::int64_t inter,
                                    std::mt19937_64& rng) {
  CostTable table;
  table.model = "synthetic-decoder";
  table.formats = {"MXFP4", "NVFP4", "MXFP8", "BF16"};
  std::lognormal_distribution<double> sensitivity(0.0, 1.5);
  std::uniform_real_distribution<double> noise(0.8, 1.25);
  struct Proj {
    const char* name;
    std::int64_t out, in;
    const char* group;
  };
  const Proj projs[] = {{"self_attn.q_proj", hidden, hidden, "qkv_proj"},
                        {"self_attn.k_proj", hidden / 2, hidden, "qkv_proj"},
                        {"self_attn.v_proj", hidden / 2, hidden, "qkv_proj"},
                        {"self_attn.o_proj", hidden, hidden, ""},
                        {"mlp.gate_proj", inter, hidden, "gate_up_proj"},
                        {"mlp.up_proj", inter, hidden, "gate_up_proj"},
                        {"mlp.down_proj", hidden, inter, ""}};
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (const Proj& p : projs) {
      LinearCost linear;
      linear.name = fmt::format("model.layers.{}.{}", layer, p.name);
      linear.shape = {p.out, p.in};
      linear.params = static_cast<std::uint64_t>(p.out * p.in);
      if (*p.group) linear.group = fmt::format("model.layers.{}.{}", layer, p.group);
      const std::uint64_t n = linear.params;
      const double s = sensitivity(rng) * static_cast<double>(n) * 1e-6;
      linear.costs = {cost(n / 2 + n / 32, s * 1.4 * noise(rng)),
                      cost(n / 2 + n / 16, s * noise(rng)),
                      cost(n + n / 32, s * 0.004 * noise(rng)), cost(2 * n, 0.0)};
      table.linears.push_back(std::move(linear));
    }
  }
  table.passthrough_params = static_cast<std::uint64_t>(2 * 1000 * hidden);
  table.passthrough_bytes = 2 * table.passthrough_params;
  return table;
}

}  // namespace pq::alloc::test
