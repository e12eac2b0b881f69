// Database URLs, connections, typed errors and the migration runner, against real SQLite files
// and a real PostgreSQL server.
#include <doctest/doctest.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>
#include <natspubsub/store/sqlite.hpp>

#include "support/databases.hpp"

using namespace natspubsub::store;
using natspubsub::testing::fresh_postgres_database;
using natspubsub::testing::run_concurrently;
using natspubsub::testing::sqlite_file;
using natspubsub::testing::TempDir;

namespace {

constexpr const char* kSecret = "s3cr3t-Pw";

std::string error_message(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

// Tables, columns, indexes and recorded versions: what a second migration run must not change.
std::string sqlite_schema(SqliteDatabase& db) {
  std::string out;
  for (const auto& row : db.query("SELECT type, name, COALESCE(sql, '') FROM sqlite_master ORDER BY type, name")) {
    out += row.as_text(0) + " " + row.as_text(1) + ": " + row.as_text(2) + "\n";
  }
  for (const auto& row : db.query("SELECT version, name FROM natspubsub_schema_migrations ORDER BY version")) {
    out += "migration " + row.as_text(0) + " " + row.as_text(1) + "\n";
  }
  return out;
}

std::string postgres_schema(PostgresDatabase& db) {
  std::string out;
  for (const auto& row : db.query(
           "SELECT table_name, column_name, data_type, COALESCE(column_default, ''), is_nullable "
           "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, ordinal_position")) {
    out += row.as_text(0) + "." + row.as_text(1) + " " + row.as_text(2) + " " + row.as_text(3) + " " +
           row.as_text(4) + "\n";
  }
  for (const auto& row : db.query("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")) {
    out += row.as_text(0) + ": " + row.as_text(1) + "\n";
  }
  for (const auto& row : db.query("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                                  "WHERE connamespace = 'public'::regnamespace ORDER BY 1")) {
    out += row.as_text(0) + ": " + row.as_text(1) + "\n";
  }
  for (const auto& row : db.query("SELECT version, name FROM natspubsub_schema_migrations ORDER BY version")) {
    out += "migration " + row.as_text(0) + " " + row.as_text(1) + "\n";
  }
  return out;
}

// The fixture's URL with a password added (the test server trusts loopback, so it is ignored
// by the server, but it is in everything the library sees).
std::string with_password(const std::string& url) {
  auto at = url.find('@');
  REQUIRE(at != std::string::npos);
  return url.substr(0, at) + ":" + kSecret + url.substr(at);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// URLs

TEST_CASE("url: sqlite absolute and relative paths") {
  auto absolute = DatabaseUrl::parse("sqlite:///var/lib/app/orders.db");
  CHECK(absolute.backend() == Backend::sqlite);
  CHECK(absolute.path() == "/var/lib/app/orders.db");

  auto relative = DatabaseUrl::parse("sqlite://data/orders.db");
  CHECK(relative.backend() == Backend::sqlite);
  CHECK(relative.path() == "data/orders.db");
  CHECK(DatabaseUrl::parse("SQLITE://x.db").path() == "x.db");
}

TEST_CASE("url: postgresql and postgres forms") {
  auto url = DatabaseUrl::parse(std::string("postgresql://app:") + kSecret + "@db.internal:6543/orders");
  CHECK(url.backend() == Backend::postgres);
  CHECK(url.user() == "app");
  CHECK(url.host() == "db.internal");
  CHECK(url.port() == 6543);
  CHECK(url.database() == "orders");
  CHECK(url.has_password());
  CHECK(url.redacted() == "postgresql://app:***@db.internal:6543/orders");
  CHECK(url.redacted().find(kSecret) == std::string::npos);
  // libpq gets the URI as written, with a bound on connecting added.
  CHECK(url.postgres_conninfo() == std::string("postgresql://app:") + kSecret + "@db.internal:6543/orders?connect_timeout=10");

  auto short_form = DatabaseUrl::parse("postgres://app@localhost/orders");
  CHECK(short_form.backend() == Backend::postgres);
  CHECK(short_form.port() == 5432);
  CHECK_FALSE(short_form.has_password());
  CHECK(short_form.redacted() == "postgres://app@localhost/orders");

  // Percent-encoding, IPv6 literal, query parameters (a password there is hidden too).
  auto encoded = DatabaseUrl::parse("postgresql://us%40er:p%40ss'w@[::1]:5433/my%20db?sslmode=disable&connect_timeout=3");
  CHECK(encoded.user() == "us@er");
  CHECK(encoded.host() == "::1");
  CHECK(encoded.port() == 5433);
  CHECK(encoded.database() == "my db");
  CHECK(encoded.postgres_conninfo() ==
        "postgresql://us%40er:p%40ss'w@[::1]:5433/my%20db?sslmode=disable&connect_timeout=3");
  CHECK(encoded.redacted().find("p%40ss") == std::string::npos);

  auto query_password = DatabaseUrl::parse(std::string("postgresql://app@db/orders?password=") + kSecret);
  CHECK(query_password.has_password());
  CHECK(query_password.redacted() == "postgresql://app@db/orders?password=***");
  CHECK(query_password.scrub(std::string("failed for ") + kSecret) == "failed for ***");
}

TEST_CASE("url: every form libpq reads is accepted and passed on as written") {
  // The default socket, a socket directory as a parameter, no database name (libpq: the user's).
  auto socket = DatabaseUrl::parse("postgresql:///orders?host=/run/postgresql");
  CHECK(socket.host() == "/run/postgresql");
  CHECK(socket.database() == "orders");
  CHECK(socket.redacted() == "postgresql:///orders?host=/run/postgresql");
  CHECK(socket.postgres_conninfo() == "postgresql:///orders?host=/run/postgresql&connect_timeout=10");
  CHECK(DatabaseUrl::parse("postgresql://app@/orders").host().empty());
  CHECK(DatabaseUrl::parse("postgres://app@db:5432").database().empty());
  auto several = DatabaseUrl::parse(std::string("postgresql://app:") + kSecret + "@db1:5433,db2:5434/orders?target_session_attrs=read-write");
  CHECK(several.host() == "db1,db2");
  CHECK(several.port() == 5433);
  CHECK(several.redacted() == "postgresql://app:***@db1:5433,db2:5434/orders?target_session_attrs=read-write");
  auto moved = DatabaseUrl::parse(std::string("postgresql://app@db/orders?password=") + kSecret + "&host=elsewhere");
  CHECK(moved.host() == "elsewhere");
  CHECK(moved.redacted().find(kSecret) == std::string::npos);
}

TEST_CASE("url: malformed URLs are DatabaseUrlError and never show the password") {
  const std::string s = kSecret;
  const std::vector<std::string> bad = {
      "",
      "mysql://app:" + s + "@db/orders",
      "sqlite://",
      "sqlite://x.db?mode=ro",
      "postgresql://app:" + s + "@db:notaport/orders",
      "postgresql://app:" + s + "@db:70000/orders",
      "postgresql://app:" + s + "@db1:5432,db2:x/orders",
      "postgresql://app:" + s + "%zz@db/orders",
      "postgresql://app:" + s + "@[::1/orders",
      "postgresql://app:" + s + "@db/orders?Bad-Key=1",
      "postgresql://app:" + s + "@db/orders?novalue",
      "postgresql://app@db/orders?password=" + s + "&Bad=1",
  };
  for (const auto& url : bad) {
    CAPTURE(url);
    CHECK_THROWS_AS((void)DatabaseUrl::parse(url), DatabaseUrlError);
    auto message = error_message([&] { (void)DatabaseUrl::parse(url); });
    CHECK(message.find(kSecret) == std::string::npos);
    CHECK(message.find("invalid database URL") != std::string::npos);
  }
  CHECK_THROWS_AS((void)open_database("redis://localhost"), DatabaseUrlError);
}

// ---------------------------------------------------------------------------------------------
// SQLite

TEST_CASE("sqlite: opening sets WAL, the busy timeout and foreign keys") {
  TempDir dir;
  SqliteDatabase db(sqlite_file(dir), {.busy_timeout = std::chrono::milliseconds(1234)});
  CHECK(db.query("PRAGMA journal_mode").at(0).as_text(0) == "wal");
  CHECK(db.query("PRAGMA busy_timeout").at(0).as_int(0) == 1234);
  CHECK(db.query("PRAGMA foreign_keys").at(0).as_int(0) == 1);
  CHECK(db.description() == "sqlite://" + sqlite_file(dir));

  auto opened = open_database("sqlite://" + sqlite_file(dir, "other.db"));
  CHECK(opened->backend() == Backend::sqlite);
  CHECK(std::filesystem::exists(dir.path() / "other.db"));

  CHECK_THROWS_AS(SqliteDatabase((dir.path() / "missing-dir" / "x.db").string()), DatabaseError);
}

TEST_CASE("sqlite: parameters by number and position, values of every type") {
  TempDir dir;
  SqliteDatabase db(sqlite_file(dir));
  db.execute("CREATE TABLE t (a INTEGER, b TEXT, c REAL, d TEXT)");
  // $2 before $1: parameters go by number, not by order of appearance.
  CHECK(db.execute("INSERT INTO t (b, a, c, d) VALUES ($2, $1, $3, $4)", {7, "seven", 7.5, nullptr}) == 1);
  CHECK(db.execute("INSERT INTO t (a, b, c, d) VALUES (?, ?, ?, ?)", {8, std::string("it's"), 0.25, "x"}) == 1);
  std::optional<std::string> none;
  CHECK(db.execute("INSERT INTO t (a, b) VALUES ($1, $1 || $2)", {9, none}) == 1);

  auto rows = db.query("SELECT a, b, c, d FROM t ORDER BY a");
  REQUIRE(rows.size() == 3);
  CHECK(rows[0].as_int(0) == 7);
  CHECK(rows[0].as_text(1) == "seven");
  CHECK(rows[0][2].as_real() == doctest::Approx(7.5));
  CHECK(rows[0].is_null(3));
  CHECK(rows[1].as_text(1) == "it's");
  CHECK(rows[2].is_null(1));  // '9' || NULL

  CHECK_THROWS_AS(db.execute("INSERT INTO t (a) VALUES ($2)", {1, 2, 3}), DatabaseError);
  CHECK_THROWS_AS(db.execute("INSERT INTO t (a) VALUES ($2)", {1}), DatabaseError);
  CHECK_THROWS_AS(db.execute("INSERT INTO t (a) VALUES (:name)", {1}), DatabaseError);
  CHECK_THROWS_AS(db.execute("SELECT 1; SELECT 2"), DatabaseError);
}

TEST_CASE("sqlite: a transaction commits, or rolls back when dropped") {
  TempDir dir;
  SqliteDatabase db(sqlite_file(dir));
  db.execute("CREATE TABLE t (a INTEGER)");
  {
    auto txn = db.begin();
    txn.execute("INSERT INTO t VALUES (1)");
    CHECK(db.transaction_open());
    CHECK_THROWS_AS((void)db.begin(), DatabaseError);  // one at a time per connection
  }  // dropped: rolled back
  CHECK_FALSE(db.transaction_open());
  CHECK(db.query("SELECT count(*) FROM t").at(0).as_int(0) == 0);
  {
    auto txn = db.begin();
    txn.execute("INSERT INTO t VALUES (2)");
    txn.commit();
    CHECK_FALSE(txn.active());
    CHECK_THROWS_AS(txn.execute("INSERT INTO t VALUES (3)"), DatabaseError);
  }
  CHECK(db.query("SELECT a FROM t").at(0).as_int(0) == 2);

  CHECK_THROWS_AS(db.in_transaction([](Transaction& tx) {
    tx.execute("INSERT INTO t VALUES ($1)", {4});
    throw std::runtime_error("business rule");
  }),
                  std::runtime_error);
  db.in_transaction([](Transaction& tx) {
    CHECK(tx.backend() == Backend::sqlite);
    tx.execute("INSERT INTO t VALUES ($1)", {5});
  });
  CHECK(db.query("SELECT group_concat(a) FROM (SELECT a FROM t ORDER BY a)").at(0).as_text(0) == "2,5");
}

TEST_CASE("sqlite: errors are typed: unique violation, busy is retryable, others generic") {
  TempDir dir;
  SqliteDatabase db(sqlite_file(dir));
  db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE, n INTEGER NOT NULL)");
  db.execute("INSERT INTO t VALUES (1, 'a', 1)");

  try {
    db.execute("INSERT INTO t VALUES (2, 'a', 1)");
    FAIL("expected a unique violation");
  } catch (const UniqueViolationError& e) {
    CHECK(e.code() == "SQLITE_CONSTRAINT_UNIQUE");
    CHECK(e.query().find("INSERT INTO t") != std::string::npos);
  }
  CHECK_THROWS_AS(db.execute("INSERT INTO t VALUES (1, 'b', 1)"), UniqueViolationError);

  try {
    db.execute("INSERT INTO t VALUES (3, 'c', NULL)");
    FAIL("expected a NOT NULL failure");
  } catch (const UniqueViolationError&) {
    FAIL("NOT NULL is not a unique violation");
  } catch (const RetryableDatabaseError&) {
    FAIL("NOT NULL is not retryable");
  } catch (const DatabaseError& e) {
    CHECK(e.code() == "SQLITE_CONSTRAINT_NOTNULL");
  }

  try {
    (void)db.query("SELEC nonsense");
    FAIL("expected a syntax error");
  } catch (const RetryableDatabaseError&) {
    FAIL("a syntax error is not retryable");
  } catch (const DatabaseError& e) {
    // The statement travels in query(); the message stays one line without SQL.
    CHECK(e.query() == "SELEC nonsense");
    CHECK(std::string(e.what()).find("SELEC nonsense") == std::string::npos);
  }

  // Another connection holds the write lock longer than our busy timeout.
  SqliteDatabase other(sqlite_file(dir), {.busy_timeout = std::chrono::milliseconds(100)});
  auto holder = db.begin();
  holder.execute("INSERT INTO t VALUES (10, 'held', 1)");
  auto started = std::chrono::steady_clock::now();
  try {
    (void)other.begin();
    FAIL("expected SQLITE_BUSY");
  } catch (const RetryableDatabaseError& e) {
    CHECK(e.code() == "SQLITE_BUSY");
  }
  CHECK(std::chrono::steady_clock::now() - started >= std::chrono::milliseconds(90));
  CHECK_THROWS_AS(other.execute("INSERT INTO t VALUES (11, 'x', 1)"), RetryableDatabaseError);
  holder.commit();
  CHECK(other.execute("INSERT INTO t VALUES (11, 'x', 1)") == 1);  // free again
}

TEST_CASE("sqlite: migrations apply once; running them again changes nothing") {
  auto list = migrations(Backend::sqlite);
  REQUIRE_FALSE(list.empty());
  CHECK(list.front().version == 1);
  CHECK(list.front().name == "0001_outbox_inbox.sql");
  CHECK(list.front().sql.find("CREATE TABLE natspubsub_outbox") != std::string_view::npos);
  for (std::size_t i = 1; i < list.size(); ++i) CHECK(list[i - 1].version < list[i].version);

  TempDir dir;
  SqliteDatabase db(sqlite_file(dir));
  CHECK(applied_migrations(db).empty());
  auto first = migrate(db);
  CHECK(first.size() == list.size());
  auto schema = sqlite_schema(db);
  CHECK(schema.find("natspubsub_outbox_claim_idx") != std::string::npos);
  CHECK(schema.find("natspubsub_inbox_processed_idx") != std::string::npos);

  CHECK(migrate(db).empty());
  CHECK(sqlite_schema(db) == schema);
  Database& generic = db;
  CHECK(migrate(generic).empty());
  CHECK(applied_migrations(generic).size() == list.size());

  // A fresh connection, as a restarted service would have.
  SqliteDatabase again(sqlite_file(dir));
  CHECK(migrate(again).empty());
  CHECK(sqlite_schema(again) == schema);
}

TEST_CASE("sqlite: two processes migrating at once both succeed, applying each version once") {
  TempDir dir;
  std::vector<std::vector<int>> applied(2);
  run_concurrently(2, [&](int i) {
    SqliteDatabase db(sqlite_file(dir));
    applied[static_cast<std::size_t>(i)] = migrate(db);
  });
  CHECK(applied[0].size() + applied[1].size() == migrations(Backend::sqlite).size());
  SqliteDatabase db(sqlite_file(dir));
  CHECK(applied_migrations(db).size() == migrations(Backend::sqlite).size());
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

TEST_CASE("postgres: connect, run parameterised SQL, transactions") {
  auto url = with_password(fresh_postgres_database("store_basic"));
  auto opened = open_database(url);
  CHECK(opened->backend() == Backend::postgres);
  CHECK(opened->description().find(kSecret) == std::string::npos);
  CHECK(opened->description().find("***") != std::string::npos);

  // A URI with no host in its authority, everything as parameters (as in
  // postgresql:///db?host=/run/postgresql): libpq reads it as written.
  auto parsed = DatabaseUrl::parse(url);
  auto as_parameters = "postgresql:///" + parsed.database() + "?host=" + parsed.host() +
                       "&port=" + std::to_string(parsed.port()) + "&user=" + parsed.user();
  CHECK(PostgresDatabase(as_parameters).query("SELECT 41 + 1").at(0).as_int(0) == 42);

  PostgresDatabase db(url);
  db.execute("CREATE TABLE t (a bigint, b text, c double precision)");
  CHECK(db.execute("INSERT INTO t (b, a, c) VALUES ($2, $1, $3)", {7, "it's", 0.5}) == 1);
  CHECK(db.execute("INSERT INTO t (a, b) VALUES ($1, $2)", {8, nullptr}) == 1);
  auto rows = db.query("SELECT a, b, c FROM t ORDER BY a");
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].as_int(0) == 7);
  CHECK(rows[0].as_text(1) == "it's");
  CHECK(rows[0][2].as_real() == doctest::Approx(0.5));
  CHECK(rows[1].is_null(1));

  CHECK_THROWS_AS(db.in_transaction([](Transaction& tx) {
    tx.execute("INSERT INTO t (a) VALUES ($1)", {9});
    throw std::runtime_error("business rule");
  }),
                  std::runtime_error);
  db.in_transaction([](Transaction& tx) {
    CHECK(tx.backend() == Backend::postgres);
    CHECK_THROWS_AS((void)tx.sqlite(), DatabaseError);
    tx.execute("INSERT INTO t (a) VALUES ($1)", {10});
  });
  CHECK(db.query("SELECT string_agg(a::text, ',' ORDER BY a) FROM t").at(0).as_text(0) == "7,8,10");
}

TEST_CASE("postgres: errors are typed by SQLSTATE and never show the password") {
  auto url = with_password(fresh_postgres_database("store_errors"));
  PostgresDatabase db(url);
  db.execute("CREATE TABLE t (id integer PRIMARY KEY, v integer NOT NULL)");
  db.execute("INSERT INTO t VALUES (1, 0)");

  try {
    db.execute("INSERT INTO t VALUES ($1, $2)", {1, 5});
    FAIL("expected a unique violation");
  } catch (const UniqueViolationError& e) {
    CHECK(e.code() == "23505");
    CHECK(e.query().find("INSERT INTO t") != std::string::npos);
  }

  // Generic error: carries the query, not the parameter values, not the password.
  try {
    (void)db.query("SELECT * FROM no_such_table WHERE x = $1", {"parameter-value"});
    FAIL("expected an error");
  } catch (const RetryableDatabaseError&) {
    FAIL("an undefined table is not retryable");
  } catch (const UniqueViolationError&) {
    FAIL("an undefined table is not a unique violation");
  } catch (const DatabaseError& e) {
    CHECK(e.code() == "42P01");
    std::string message = e.what();
    CHECK(message.find("no_such_table") != std::string::npos);
    CHECK(message.find("parameter-value") == std::string::npos);
    CHECK(message.find(kSecret) == std::string::npos);
  }

  // Serialization failure: our REPEATABLE READ snapshot predates another session's update of
  // the row we then update.
  PostgresDatabase other(url);
  try {
    db.in_transaction(
        [&](Transaction& tx) {
          (void)tx.query("SELECT v FROM t WHERE id = 1");  // takes the snapshot
          other.execute("UPDATE t SET v = v + 1 WHERE id = 1");
          tx.execute("UPDATE t SET v = v + 10 WHERE id = 1");
        },
        Isolation::repeatable_read);
    FAIL("expected a serialization failure");
  } catch (const RetryableDatabaseError& e) {
    CHECK(e.code() == "40001");
    CHECK(std::string(e.what()).find(kSecret) == std::string::npos);
  }
  CHECK(db.query("SELECT v FROM t WHERE id = 1").at(0).as_int(0) == 1);

  // No server on the port: retryable, and the message names the place without the password.
  auto port = natspubsub::testing::free_port();
  auto nowhere = std::string("postgresql://app:") + kSecret + "@127.0.0.1:" + std::to_string(port) + "/x";
  try {
    PostgresDatabase unreachable(nowhere);
    FAIL("expected a connection failure");
  } catch (const RetryableDatabaseError& e) {
    std::string message = e.what();
    CHECK(message.find(kSecret) == std::string::npos);
    CHECK(message.find("127.0.0.1:" + std::to_string(port)) != std::string::npos);
  }
  auto missing_db = url.substr(0, url.rfind('/')) + "/no_such_database";
  auto message = error_message([&] { PostgresDatabase missing(missing_db); });
  CHECK(message.find("no_such_database") != std::string::npos);
  CHECK(message.find(kSecret) == std::string::npos);
}

TEST_CASE("postgres: migrations apply once; running them again changes nothing") {
  PostgresDatabase db(fresh_postgres_database("store_migrate"));
  CHECK(applied_migrations(db).empty());
  auto list = migrations(Backend::postgres);
  REQUIRE_FALSE(list.empty());
  CHECK(migrate(db).size() == list.size());
  auto schema = postgres_schema(db);
  CHECK(schema.find("natspubsub_outbox_partition_idx") != std::string::npos);
  CHECK(schema.find("natspubsub_inbox_pkey") != std::string::npos);
  CHECK(migrate(db).empty());
  CHECK(postgres_schema(db) == schema);
  CHECK(db.query("SELECT count(*) FROM natspubsub_schema_migrations").at(0).as_int(0) ==
        static_cast<std::int64_t>(list.size()));
}

TEST_CASE("postgres: two runners starting at once both succeed") {
  auto url = fresh_postgres_database("store_concurrent_migrate");
  for (int round = 0; round < 2; ++round) {  // round 1: both find the schema current
    CAPTURE(round);
    std::vector<std::vector<int>> applied(2);
    run_concurrently(2, [&](int i) {
      PostgresDatabase db(url);  // one connection per runner, as two processes would have
      applied[static_cast<std::size_t>(i)] = migrate(db);
    });
    auto expected = round == 0 ? migrations(Backend::postgres).size() : 0;
    CHECK(applied[0].size() + applied[1].size() == expected);
  }
  PostgresDatabase db(url);
  CHECK(applied_migrations(db).size() == migrations(Backend::postgres).size());
}
