#pragma once
// Running parameterised SQL through libpqxx with the library's Value parameters (not installed).
#include <string_view>
#include <vector>

#include <pqxx/dbtransaction>
#include <pqxx/result>
#include <pqxx/transaction_base>

#include <natspubsub/store/database.hpp>

namespace natspubsub::store::detail {

/// Runs one statement with $1..$n bound to `params`; libpqxx errors come out as the typed
/// store errors (rethrow_postgres_error), scrubbed of `url`'s password when given.
pqxx::result pg_exec(pqxx::transaction_base& txn, std::string_view sql, const Params& params = {},
                     const DatabaseUrl* url = nullptr);

/// Every field as text (or NULL).
[[nodiscard]] std::vector<Row> to_rows(const pqxx::result& result);

}  // namespace natspubsub::store::detail
