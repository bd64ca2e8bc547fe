# pq_simd_source(FILE FLAGS...): compile one source with ISA flags. Only code reached through a
# run-time CPUID check may live in such a file.
# The property is set in the scope of target pq (created in src/), which otherwise would not see
# properties set from a stage's subdirectory.
function(pq_simd_source file)
  get_filename_component(path ${file} ABSOLUTE)
  set_source_files_properties(${path} TARGET_DIRECTORY pq PROPERTIES COMPILE_OPTIONS "${ARGN}")
endfunction()

# pq_add_test(NAME SOURCES...): one GoogleTest executable registered with CTest. gtest_discover_tests
# passes only ONE environment variable (a ';' list is split into property arguments); test_main.cpp
# sets the OpenMP ones, and EXTRA_ARGS --env=NAME=VALUE any other.
function(pq_add_test name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE pq pq_test_support pq_test_main GTest::gmock)
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES
                       ENVIRONMENT "PQ_SHARED_DIR=${PQ_SHARED_DIR}")
endfunction()

# pq_add_bench(NAME SOURCES...): one Google Benchmark executable.
function(pq_add_bench name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE pq benchmark::benchmark)
endfunction()
