#pragma once
// The SQL files of migrations/, compiled in by cmake/embed_migrations.cmake (not installed).
#include <span>
#include <string_view>

#include <natspubsub/store/database.hpp>

namespace natspubsub::store::detail {

struct EmbeddedMigration {
  int version;
  std::string_view name;
  std::string_view sql;
};

/// In file-name order, which the zero-padded numbers make version order.
[[nodiscard]] std::span<const EmbeddedMigration> embedded_migrations(Backend backend) noexcept;

}  // namespace natspubsub::store::detail
