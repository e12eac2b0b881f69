// The transactional outbox and the inbox on SQLite.
//   ./build/examples/outbox_sqlite_example /tmp/orders.db
// Writes an order and its `order.created` event in one transaction, then processes the event
// through the inbox twice: the second time is recognised as a duplicate.
#include <cstdio>

#include <natspubsub/envelope.hpp>
#include <natspubsub/inbox.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/sqlite.hpp>

int main(int argc, char** argv) try {
  natspubsub::store::SqliteDatabase db(argc > 1 ? argv[1] : "orders.db");
  natspubsub::store::migrate(db);  // creates natspubsub_outbox, natspubsub_inbox
  db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, amount_cents INTEGER NOT NULL)");
  db.execute("CREATE TABLE IF NOT EXISTS payments (order_id INTEGER PRIMARY KEY)");

  // 1. The business write and its event commit together (or neither does).
  auto event = natspubsub::Envelope::make("order.created", "orders", {{"order_id", 7}, {"amount_cents", 2599}});
  {
    auto tx = db.begin();
    tx.execute("INSERT INTO orders (id, amount_cents) VALUES ($1, $2)", {7, 2599});
    natspubsub::enqueue(tx, "development.orders.order.created", event, /*partition_key=*/std::string("order-7"));
    tx.commit();
  }  // natspubsub-relay publishes the row from here on

  // 2. On the consuming side: the handler's writes and the inbox row commit together.
  auto inbox = natspubsub::make_inbox(db);
  natspubsub::InboxKey key;
  key.consumer = "payments";  // the durable consumer's name
  key.event_id = event.event_id;
  key.subject = "development.orders.order.created";
  for (int delivery = 1; delivery <= 2; ++delivery) {
    auto result = inbox->process(key, [&](natspubsub::store::Transaction& tx) {
      tx.execute("INSERT INTO payments (order_id) VALUES ($1)", {event.message["order_id"].get<int>()});
    });
    std::printf("delivery %d: %s\n", delivery, std::string(natspubsub::to_string(result)).c_str());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
