// The order service of the demo: creates orders and, in the same database transaction, the
// `order.created` event in the outbox. It never talks to NATS: natspubsub-relay publishes.
//
//   order_service DATABASE_URL [COUNT [UNPAYABLE]]
//     DATABASE_URL  sqlite:///tmp/orders.db or postgresql://user:pass@host/db
//     COUNT         orders to create (default 10)
//     UNPAYABLE     the number of the order created with a negative amount (default: none)
//   Environment: NATSPUBSUB_ENV (default "development"), the first token of the subject.
#include <cstdio>
#include <cstdlib>
#include <string>

#include <natspubsub/config.hpp>
#include <natspubsub/envelope.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/database.hpp>
#include <natspubsub/store/migrations.hpp>

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s DATABASE_URL [COUNT [UNPAYABLE]]\n", argv[0]);
    return 2;
  }
  const int count = argc > 2 ? std::atoi(argv[2]) : 10;
  const int unpayable = argc > 3 ? std::atoi(argv[3]) : 0;
  auto config = natspubsub::Config::from_env(natspubsub::Config::development("orders"));

  auto db = natspubsub::store::open_database(argv[1]);
  natspubsub::store::migrate(*db);
  db->in_transaction([](natspubsub::store::Transaction& tx) {
    tx.execute("CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, amount_cents BIGINT NOT NULL)");
  });
  int64_t first_id = 1;
  db->in_transaction([&](natspubsub::store::Transaction& tx) {
    first_id = tx.query("SELECT COALESCE(MAX(id), 0) + 1 FROM orders")[0].as_int(0);
  });

  for (int i = 1; i <= count; ++i) {
    const int64_t id = first_id + i - 1;
    const int64_t amount = i == unpayable ? -500 : 1000 + i;
    auto event = natspubsub::Envelope::make("order.created", config.app, {{"order_id", id}, {"amount_cents", amount}});
    event.message_type = "OrderCreated";
    // The order and its event commit together: no event without an order, no order without its event.
    db->in_transaction([&](natspubsub::store::Transaction& tx) {
      tx.execute("INSERT INTO orders (id, amount_cents) VALUES ($1, $2)", {id, amount});
      natspubsub::enqueue(tx, config.subject("order.created"), event, "order-" + std::to_string(id));
    });
  }
  std::printf("orders created: %d\n", count);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "order_service: %s\n", e.what());
  return 1;
}
