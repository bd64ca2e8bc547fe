#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "common/error.h"
#include "common/interrupt.h"
#include "common/location_lock.h"

int main(int argc, char** argv) {
  CLI::App app{
      "prismaquant: mixed-precision quantization of LLM checkpoints, chosen by "
      "measurement"};
  app.set_version_flag("--version", PQ_VERSION);
  app.require_subcommand(1);
  pq::cli::register_inspect(app);
  pq::cli::register_allocate(app);
  pq::cli::register_probe(app);
  pq::cli::register_cost(app);
  pq::cli::register_quantize(app);
  pq::cli::register_formats(app);
  pq::cli::register_export(app);
  pq::cli::register_eval(app);
  pq::cli::register_generate(app);
  pq::cli::register_scout(app);
  pq::cli::register_validate(app);
  std::string command_line = "prismaquant";
  for (int i = 1; i < argc; ++i) command_line += fmt::format(" {}", argv[i]);
  pq::set_run_description(command_line);
  pq::install_interrupt_handlers();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const pq::Interrupted& e) {
    std::fprintf(stderr, "prismaquant: %s\n", e.what());
    return 128 + e.signal_number();  // the shell's status for a run ended by that signal
  } catch (const pq::Error& e) {
    std::fprintf(stderr, "prismaquant: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "prismaquant: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}
