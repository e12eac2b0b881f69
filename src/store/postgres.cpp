#include <natspubsub/store/postgres.hpp>

#include <string>

#include <pqxx/except>
#include <pqxx/nontransaction>
#include <pqxx/prepared_statement>
#include <pqxx/transaction>

#include "store/logger.hpp"
#include "store/postgres_exec.hpp"

namespace natspubsub::store {

namespace {

// libpq messages end with a newline and put DETAIL/HINT on further lines; one line reads better
// in logs while keeping the detail.
std::string one_line(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\n') {
      if (!out.empty() && out.back() != ' ') out += ' ';
    } else if (c != '\t') {
      out += c;
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

bool retryable_sqlstate(const std::string& state) {
  return state == "40001" || state == "40P01" || state == "40003" || state == "40000" ||
         state.starts_with("08") || state == "57P01" || state == "57P02" || state == "57P03";
}

}  // namespace

[[noreturn]] void rethrow_postgres_error(std::string_view context, const DatabaseUrl* url) {
  auto clean = [&](std::string message) {
    if (!context.empty()) message = std::string(context) + ": " + message;
    return url != nullptr ? url->scrub(std::move(message)) : message;
  };
  try {
    throw;
  } catch (const DatabaseError&) {
    throw;
  } catch (const pqxx::broken_connection& e) {
    throw RetryableDatabaseError(clean("PostgreSQL connection failed: " + one_line(e.what())), "08006");
  } catch (const pqxx::serialization_failure& e) {
    throw RetryableDatabaseError(clean(one_line(e.what())), "40001");
  } catch (const pqxx::deadlock_detected& e) {
    throw RetryableDatabaseError(clean(one_line(e.what())), "40P01");
  } catch (const pqxx::statement_completion_unknown& e) {
    throw RetryableDatabaseError(clean(one_line(e.what())), "40003");
  } catch (const pqxx::transaction_rollback& e) {
    throw RetryableDatabaseError(clean(one_line(e.what())), "40000");
  } catch (const pqxx::in_doubt_error& e) {
    // Not retryable blindly: the commit may have happened. The caller has to look.
    throw DatabaseError(clean("connection lost during COMMIT, outcome unknown: " + one_line(e.what())), "08007");
  } catch (const pqxx::sql_error& e) {
    const std::string& state = e.sqlstate();
    // The statement is in DatabaseError::query(), not in the one-line message.
    std::string message = clean(one_line(e.what()));
    std::string query = url != nullptr ? url->scrub(e.query()) : e.query();
    if (state == "23505") throw UniqueViolationError(message, state, std::move(query));
    if (retryable_sqlstate(state)) throw RetryableDatabaseError(message, state, std::move(query));
    throw DatabaseError(message, state, std::move(query));
  } catch (const pqxx::pqxx_exception& e) {
    throw DatabaseError(clean(one_line(e.base().what())));
  }
}

namespace detail {

pqxx::result pg_exec(pqxx::transaction_base& txn, std::string_view sql, const Params& params,
                     const DatabaseUrl* url) {
  // libpq takes every parameter as text (or NULL) and lets the server infer its type from the
  // statement; casts in the SQL ($1::bigint) settle ambiguous cases.
  std::vector<std::string> texts;
  texts.reserve(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    texts.push_back(params[i].is_null() ? std::string() : params[i].as_text());
    // libpq takes parameters as C strings, so a NUL byte would silently cut the value there.
    // PostgreSQL text cannot hold NUL anyway: refuse it as the server refuses bad encoding.
    if (texts.back().find('\0') != std::string::npos) {
      throw DatabaseError("parameter $" + std::to_string(i + 1) +
                              " contains a NUL byte, which PostgreSQL text cannot store",
                          "22021", url != nullptr ? url->scrub(std::string(sql)) : std::string(sql));
    }
  }
  std::vector<const char*> pointers;
  pointers.reserve(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    pointers.push_back(params[i].is_null() ? nullptr : texts[i].c_str());
  }
  try {
    return txn.exec_params(std::string(sql), pqxx::prepare::make_dynamic_params(pointers));
  } catch (...) {
    rethrow_postgres_error("", url);
  }
}

std::vector<Row> to_rows(const pqxx::result& result) {
  std::vector<Row> rows;
  rows.reserve(result.size());
  for (const auto& r : result) {
    std::vector<Value> values;
    values.reserve(r.size());
    for (const auto& field : r) {
      if (field.is_null()) {
        values.emplace_back();
      } else {
        values.emplace_back(std::string(field.c_str(), field.size()));
      }
    }
    rows.emplace_back(std::move(values));
  }
  return rows;
}

}  // namespace detail

PostgresDatabase::PostgresDatabase(std::string_view url) : PostgresDatabase(DatabaseUrl::parse(url)) {}

PostgresDatabase::PostgresDatabase(DatabaseUrl url) : url_(std::move(url)) {
  if (url_.backend() != Backend::postgres) {
    throw DatabaseUrlError("not a PostgreSQL URL: " + url_.redacted());
  }
  try {
    connection_ = std::make_unique<pqxx::connection>(url_.postgres_conninfo());
  } catch (...) {
    rethrow_postgres_error("connecting to " + url_.redacted(), &url_);
  }
  detail::logger()->debug("natspubsub: connected to {}", url_.redacted());
}

PostgresDatabase::~PostgresDatabase() = default;

void PostgresDatabase::in_transaction(const std::function<void(Transaction&)>& fn, Isolation isolation) {
  // One body for the three isolation levels, which are distinct libpqxx types.
  auto run = [&](auto& txn) {
    Transaction handle(txn);
    fn(handle);
    txn.commit();
  };
  try {
    switch (isolation) {
      case Isolation::read_committed: {
        pqxx::work txn(*connection_);
        run(txn);
        break;
      }
      case Isolation::repeatable_read: {
        pqxx::transaction<pqxx::repeatable_read> txn(*connection_);
        run(txn);
        break;
      }
      case Isolation::serializable: {
        pqxx::transaction<pqxx::serializable> txn(*connection_);
        run(txn);
        break;
      }
    }
  } catch (...) {
    rethrow_postgres_error("", &url_);
  }
}

std::int64_t PostgresDatabase::execute(std::string_view sql, const Params& params) {
  try {
    pqxx::work txn(*connection_);
    auto result = detail::pg_exec(txn, sql, params, &url_);
    txn.commit();
    return static_cast<std::int64_t>(result.affected_rows());
  } catch (...) {
    rethrow_postgres_error("", &url_);
  }
}

std::vector<Row> PostgresDatabase::query(std::string_view sql, const Params& params) {
  try {
    pqxx::work txn(*connection_);
    auto rows = detail::to_rows(detail::pg_exec(txn, sql, params, &url_));
    txn.commit();
    return rows;
  } catch (...) {
    rethrow_postgres_error("", &url_);
  }
}

}  // namespace natspubsub::store
