// main() of every test program.
//
// OpenMP reads OMP_* when its runtime loads, before main(), and ctest cannot hand more than one
// variable to tests registered by gtest_discover_tests (CMake 3.25 writes the ENVIRONMENT list out
// as separate property arguments, so everything after the first ';' is lost). So this main
// re-executes the program once, with OMP_WAIT_POLICY=passive (idle OpenMP threads sleep instead
// of spinning, which starves the other tests on a shared 2-core machine) and OMP_NUM_THREADS=2
// unless the caller set them. Arguments --env=NAME=VALUE (gtest_discover_tests EXTRA_ARGS) set
// variables that prismaquant reads after main() starts, e.g. PQ_FORCE_SCALAR=1.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    constexpr const char kEnv[] = "--env=";
    if (i > 0 && std::strncmp(argv[i], kEnv, sizeof(kEnv) - 1) == 0) {
      const std::string assignment = argv[i] + sizeof(kEnv) - 1;
      const std::size_t equals = assignment.find('=');
      if (equals != std::string::npos && equals > 0) {
        ::setenv(assignment.substr(0, equals).c_str(), assignment.substr(equals + 1).c_str(), 1);
      }
      continue;
    }
    args.push_back(argv[i]);
  }
  args.push_back(nullptr);
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    ::setenv("OMP_NUM_THREADS", "2", 0);
    ::execv("/proc/self/exe", args.data());
    // exec failed: go on with the runtime's own defaults.
  }
  int count = static_cast<int>(args.size()) - 1;
  testing::InitGoogleTest(&count, args.data());
  return RUN_ALL_TESTS();
}
