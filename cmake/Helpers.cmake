# pq_simd_source(FILE FLAGS...): compile one source with ISA flags. Only code reached through a
# run-time CPUID check may live in such a file.
# The property is set in the scope of target pq (created in src/), which otherwise would not see
# properties set from a stage's subdirectory.
function(pq_simd_source file)
  get_filename_component(path ${file} ABSOLUTE)
  set_source_files_properties(${path} TARGET_DIRECTORY pq PROPERTIES COMPILE_OPTIONS "${ARGN}")
endfunction()

# pq_test_optimization(TARGET): test code itself is compiled at -O1 in Release. Its -O3 code
# generation (GoogleTest macros, JSON templates) was two thirds of a test file's compile time and
# buys nothing: the code under test is the library, which keeps the build type's flags.
function(pq_test_optimization target)
  target_compile_options(${target} PRIVATE $<$<CONFIG:Release>:-O1>)
endfunction()

# pq_add_test(NAME SOURCES...): one GoogleTest executable registered with CTest. gtest_discover_tests
# passes only ONE environment variable (a ';' list is split into property arguments); test_main.cpp
# sets the OpenMP ones, and EXTRA_ARGS --env=NAME=VALUE any other.
function(pq_add_test name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE pq pq_test_support pq_test_main GTest::gmock)
  pq_test_optimization(${name})
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES
                       ENVIRONMENT "PQ_SHARED_DIR=${PQ_SHARED_DIR}")
endfunction()

# pq_add_bench(NAME SOURCES...): one Google Benchmark executable.
function(pq_add_bench name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE pq benchmark::benchmark)
endfunction()
