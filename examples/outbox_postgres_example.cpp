// The transactional outbox and the inbox on PostgreSQL, inside your own libpqxx transaction.
//   ./build/examples/outbox_postgres_example postgresql://app:secret@127.0.0.1:5432/orders
#include <cstdio>

#include <pqxx/pqxx>

#include <natspubsub/envelope.hpp>
#include <natspubsub/inbox.hpp>
#include <natspubsub/outbox.hpp>
#include <natspubsub/store/migrations.hpp>
#include <natspubsub/store/postgres.hpp>

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s postgresql://user:pass@host:port/db\n", argv[0]);
    return 2;
  }
  natspubsub::store::PostgresDatabase db(argv[1]);
  natspubsub::store::migrate(db);  // safe when several processes start at once
  db.execute("CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, amount_cents BIGINT NOT NULL)");
  db.execute("CREATE TABLE IF NOT EXISTS payments (order_id BIGINT PRIMARY KEY)");

  // 1. The caller's own pqxx transaction: the order and its event commit or roll back together.
  auto event = natspubsub::Envelope::make("order.created", "orders", {{"order_id", 7}, {"amount_cents", 2599}});
  {
    pqxx::work tx(db.connection());
    tx.exec_params("INSERT INTO orders (id, amount_cents) VALUES ($1, $2)", 7, 2599);
    natspubsub::enqueue(tx, "development.orders.order.created", event, std::string("order-7"));
    tx.commit();
  }

  // 2. Exactly-once handling: a redelivery of the same event id is a duplicate.
  auto inbox = natspubsub::make_inbox(db);
  natspubsub::InboxKey key;
  key.consumer = "payments";  // the durable consumer's name
  key.event_id = event.event_id;
  key.subject = "development.orders.order.created";
  for (int delivery = 1; delivery <= 2; ++delivery) {
    auto result = inbox->process(key, [&](natspubsub::store::Transaction& tx) {
      tx.postgres().exec_params("INSERT INTO payments (order_id) VALUES ($1)", event.message["order_id"].get<int>());
    });
    std::printf("delivery %d: %s\n", delivery, std::string(natspubsub::to_string(result)).c_str());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
