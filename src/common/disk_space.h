#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string_view>

namespace pq {

// Free bytes (for an unprivileged writer) on the filesystem that holds `location`, or would hold
// it once created: that of its nearest existing ancestor. nullopt where it cannot be told.
std::optional<std::uint64_t> available_disk_bytes(const std::filesystem::path& location);

// Bytes of the regular files below `dir`, recursively; 0 where it does not exist.
std::uint64_t bytes_under(const std::filesystem::path& dir);

// Whether `a` and `b` (or the nearest existing ancestors of each) lie on one filesystem.
bool same_filesystem(const std::filesystem::path& a, const std::filesystem::path& b);

// pq::Error, before the work starts, when `needed` bytes are more than the filesystem of
// `location` has free; `what` says what they are for. Where free space cannot be told, nothing
// is checked (the writes themselves still fail cleanly).
void require_disk_space(const std::filesystem::path& location, std::uint64_t needed,
                        std::string_view what);

}  // namespace pq
