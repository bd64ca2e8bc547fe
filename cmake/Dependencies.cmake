# Every dependency comes from a Debian 12 package (scripts/setup.sh installs them).
find_package(OpenMP REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(fmt REQUIRED)
find_package(CLI11 CONFIG QUIET)
find_path(CLI11_INCLUDE_DIR CLI/CLI.hpp REQUIRED)

# OpenBLAS (OpenMP flavour): fp32 GEMM and LAPACK.
find_path(OPENBLAS_INCLUDE_DIR cblas.h
          PATHS /usr/include/x86_64-linux-gnu/openblas-openmp /usr/include/openblas REQUIRED)
find_library(OPENBLAS_LIBRARY openblas
             PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp NO_DEFAULT_PATH)
find_library(OPENBLAS_LIBRARY openblas REQUIRED)
add_library(pq_openblas INTERFACE)
target_include_directories(pq_openblas SYSTEM INTERFACE ${OPENBLAS_INCLUDE_DIR})
target_link_libraries(pq_openblas INTERFACE ${OPENBLAS_LIBRARY})

# oneDNN: bf16 matmul on AMX. Debian's dnnl CMake config is broken, so locate it by hand.
find_path(DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp REQUIRED)
find_library(DNNL_LIBRARY dnnl REQUIRED)
add_library(pq_dnnl INTERFACE)
target_include_directories(pq_dnnl SYSTEM INTERFACE ${DNNL_INCLUDE_DIR})
target_link_libraries(pq_dnnl INTERFACE ${DNNL_LIBRARY})

# Tokenizer: PCRE2 (Unicode regex pre-tokenizer) and utf8proc (NFC normalization).
find_path(PCRE2_INCLUDE_DIR pcre2.h REQUIRED)
find_library(PCRE2_LIBRARY pcre2-8 REQUIRED)
find_path(UTF8PROC_INCLUDE_DIR utf8proc.h REQUIRED)
find_library(UTF8PROC_LIBRARY utf8proc REQUIRED)
add_library(pq_text INTERFACE)
target_include_directories(pq_text SYSTEM INTERFACE ${PCRE2_INCLUDE_DIR} ${UTF8PROC_INCLUDE_DIR})
target_link_libraries(pq_text INTERFACE ${PCRE2_LIBRARY} ${UTF8PROC_LIBRARY})

if(PQ_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
if(PQ_BUILD_BENCH)
  find_package(benchmark REQUIRED)
endif()
