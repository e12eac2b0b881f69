// An order and its event in one SQLite transaction, through the headers of a library built
// without PostgreSQL (NATSPUBSUB_HAS_POSTGRES is 0: no libpqxx header is needed to compile this).
//   sqlite_only /tmp/orders.db   -> prints "pending 1" (one more each run)
#include <cstdio>
#include <string>

#include <natspubsub/envelope.hpp>
#include <natspubsub/features.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>

#if NATSPUBSUB_HAS_POSTGRES
#error "this program checks a build without PostgreSQL"
#endif

int main(int argc, char** argv) try {
  if (argc != 2) {
    std::fprintf(stderr, "usage: sqlite_only FILE.db\n");
    return 2;
  }
  auto db = natspubsub::store::open_database(std::string("sqlite://") + argv[1]);
  natspubsub::store::migrate(*db);
  auto event = natspubsub::Envelope::make("order.created", "orders", {{"order_id", 7}});
  db->in_transaction([&](natspubsub::store::Transaction& tx) {
    natspubsub::enqueue(tx, natspubsub::OutboxMessage::from_envelope("test.orders.order.created", event));
  });
  std::printf("pending %lld\n", static_cast<long long>(natspubsub::make_outbox_store(*db)->stats().pending));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "sqlite_only: %s\n", e.what());
  return 1;
}
