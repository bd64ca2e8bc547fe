#pragma once

#include <CLI/CLI.hpp>

namespace pq::cli {

// Each subcommand registers its options and its run callback on the root app. The callback
// throws pq::Error for anything the user got wrong; main() turns that into one line and exit 1.
// Add one line here and one in main.cpp per subcommand.
void register_allocate(CLI::App& app);

void register_inspect(CLI::App& app);
void register_probe(CLI::App& app);
void register_cost(CLI::App& app);
void register_quantize(CLI::App& app);
void register_formats(CLI::App& app);
void register_export(CLI::App& app);
void register_eval(CLI::App& app);      // eval.cpp
void register_generate(CLI::App& app);  // generate.cpp
void register_scout(CLI::App& app);     // scout.cpp
void register_validate(CLI::App& app);  // validate.cpp

}  // namespace pq::cli
