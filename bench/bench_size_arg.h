#pragma once

#include <cstdlib>
#include <cstring>
#include <vector>

// Takes `--gb=N` (the synthetic checkpoint's size in GB) out of argv and hands the remaining
// arguments to Google Benchmark; returns N, or `default_gb` when absent.
inline double take_gigabytes_arg(int& argc, char** argv, std::vector<char*>& rest,
                                 double default_gb) {
  double gigabytes = default_gb;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--gb=", 5) == 0) {
      gigabytes = std::atof(argv[i] + 5);
    } else {
      rest.push_back(argv[i]);
    }
  }
  argc = static_cast<int>(rest.size());
  return gigabytes;
}
