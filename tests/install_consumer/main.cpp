// Uses the installed headers and library the way a user project would.
#include <iostream>

#include <natspubsub/envelope.hpp>
#include <natspubsub/subject.hpp>

int main() {
  auto envelope = natspubsub::Envelope::make("order.created", "shop", {{"id", 1}});
  auto decoded = natspubsub::Envelope::decode(envelope.encode());
  std::cout << natspubsub::subject::build("dev", "shop", decoded.topic) << "\n";
  return decoded.event_id == envelope.event_id ? 0 : 1;
}
