// The test fixtures themselves, against the real servers they start: if these fail, every other
// test's failure is suspect.
#include <doctest/doctest.h>
#include <nats/nats.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/servers.hpp"

namespace nt = natspubsub::testing;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// cnats handles, owned the way the library will own them.
using Connection = std::unique_ptr<natsConnection, decltype(&natsConnection_Destroy)>;
using Options = std::unique_ptr<natsOptions, decltype(&natsOptions_Destroy)>;
using JetStream = std::unique_ptr<jsCtx, decltype(&jsCtx_Destroy)>;
using StreamInfo = std::unique_ptr<jsStreamInfo, decltype(&jsStreamInfo_Destroy)>;
using PubAck = std::unique_ptr<jsPubAck, decltype(&jsPubAck_Destroy)>;
using Msg = std::unique_ptr<natsMsg, decltype(&natsMsg_Destroy)>;

struct ConnectResult {
  natsStatus status;
  Connection connection{nullptr, &natsConnection_Destroy};
};

Options make_options(const std::string& url) {
  natsOptions* raw = nullptr;
  REQUIRE(natsOptions_Create(&raw) == NATS_OK);
  Options options(raw, &natsOptions_Destroy);
  REQUIRE(natsOptions_SetURL(options.get(), url.c_str()) == NATS_OK);
  // A refused connection should fail fast, not wait for reconnect attempts.
  REQUIRE(natsOptions_SetTimeout(options.get(), 2000) == NATS_OK);
  REQUIRE(natsOptions_SetAllowReconnect(options.get(), false) == NATS_OK);
  return options;
}

ConnectResult connect(natsOptions* options) {
  natsConnection* raw = nullptr;
  const natsStatus status = natsConnection_Connect(&raw, options);
  return {status, Connection(raw, &natsConnection_Destroy)};
}

ConnectResult connect(const std::string& url) { return connect(make_options(url).get()); }

JetStream jetstream(natsConnection* connection) {
  jsCtx* raw = nullptr;
  jsOptions options;
  jsOptions_Init(&options);
  options.Wait = 5000;
  REQUIRE(natsConnection_JetStream(&raw, connection, &options) == NATS_OK);
  return JetStream(raw, &jsCtx_Destroy);
}

bool account_info_ok(jsCtx* js) {
  jsAccountInfo* info = nullptr;
  jsErrCode error = static_cast<jsErrCode>(0);
  const natsStatus status = js_GetAccountInfo(&info, js, nullptr, &error);
  if (info != nullptr) jsAccountInfo_Destroy(info);
  return status == NATS_OK;
}

StreamInfo add_stream(jsCtx* js, const char* name, const char* subject, int replicas) {
  jsStreamConfig config;
  jsStreamConfig_Init(&config);
  config.Name = name;
  const char* subjects[] = {subject};
  config.Subjects = subjects;
  config.SubjectsLen = 1;
  config.Storage = js_FileStorage;
  config.Replicas = replicas;
  jsStreamInfo* raw = nullptr;
  jsErrCode error = static_cast<jsErrCode>(0);
  const natsStatus status = js_AddStream(&raw, js, &config, nullptr, &error);
  INFO("js_AddStream: ", natsStatus_GetText(status), " jsErrCode ", static_cast<int>(error), " ",
       nats_GetLastError(nullptr));
  REQUIRE(status == NATS_OK);
  return StreamInfo(raw, &jsStreamInfo_Destroy);
}

// Returns the sequence the stream gave the message, 0 on failure.
uint64_t publish(jsCtx* js, const char* subject, const std::string& data) {
  jsPubAck* raw = nullptr;
  jsErrCode error = static_cast<jsErrCode>(0);
  const natsStatus status = js_Publish(&raw, js, subject, data.data(), static_cast<int>(data.size()), nullptr, &error);
  PubAck ack(raw, &jsPubAck_Destroy);
  return status == NATS_OK && ack ? ack->Sequence : 0;
}

StreamInfo stream_info(jsCtx* js, const char* name) {
  jsStreamInfo* raw = nullptr;
  jsErrCode error = static_cast<jsErrCode>(0);
  js_GetStreamInfo(&raw, js, name, nullptr, &error);
  return StreamInfo(raw, &jsStreamInfo_Destroy);
}

bool process_gone(int pid) { return ::kill(pid, 0) == -1 && errno == ESRCH; }

// The effective uid of a process, from /proc.
int process_uid(int pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Uid:", 0) == 0) {
      std::istringstream fields(line.substr(4));
      int real = -1;
      int effective = -1;
      fields >> real >> effective;
      return effective;
    }
  }
  return -1;
}

}  // namespace

TEST_CASE("free_port returns a loopback port nothing listens on, distinct across calls") {
  const int a = nt::free_port();
  const int b = nt::free_port();
  CHECK(a > 0);
  CHECK(a < 65536);
  CHECK(a != b);
  // Bindable right now.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>(a));
  CHECK(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  ::close(fd);
}

TEST_CASE("TempDir exists while alive and is removed with its content") {
  std::filesystem::path path;
  {
    const nt::TempDir dir("fixtures-test");
    path = dir.path();
    CHECK(std::filesystem::is_directory(path));
    std::filesystem::create_directories(path / "a" / "b");
    std::ofstream(path / "a" / "b" / "file") << "x";
  }
  CHECK_FALSE(std::filesystem::exists(path));
}

TEST_CASE("run_command captures stdout and the exit status, and enforces its timeout") {
  const auto ok = nt::run_command("echo hello; echo oops >&2; exit 3");
  CHECK(ok.status == 3);
  CHECK(ok.output == "hello\n");
  CHECK(ok.error == "oops\n");

  const auto started = Clock::now();
  const auto slow = nt::run_command("sleep 30", 1s);
  CHECK(slow.status == -1);
  CHECK(Clock::now() - started < 5s);
}

TEST_CASE("NatsServer serves JetStream and keeps its store across kill() and start()") {
  nt::NatsServer nats;
  REQUIRE(nats.running());
  const int port = nats.port();
  CHECK(nats.url() == "nats://127.0.0.1:" + std::to_string(port));
  const int first_pid = nats.pid();
  CHECK(first_pid > 0);

  {
    natsConnection* raw = nullptr;
    REQUIRE(natsConnection_ConnectTo(&raw, nats.url().c_str()) == NATS_OK);
    Connection connection(raw, &natsConnection_Destroy);
    auto js = jetstream(connection.get());
    CHECK(account_info_ok(js.get()));
    const auto created = add_stream(js.get(), "FIXTURE", "fixture.>", 1);
    CHECK(std::string(created->Config->Name) == "FIXTURE");
    CHECK(publish(js.get(), "fixture.a", "survives") == 1);
  }

  nats.kill();
  CHECK_FALSE(nats.running());
  CHECK(nats.pid() == -1);
  CHECK(process_gone(first_pid));
  CHECK(connect(nats.url()).status != NATS_OK);

  nats.start();
  REQUIRE(nats.running());
  CHECK(nats.port() == port);
  CHECK(nats.pid() != first_pid);

  natsConnection* raw = nullptr;
  REQUIRE(natsConnection_ConnectTo(&raw, nats.url().c_str()) == NATS_OK);
  Connection connection(raw, &natsConnection_Destroy);
  auto js = jetstream(connection.get());
  const auto info = stream_info(js.get(), "FIXTURE");
  REQUIRE(info != nullptr);
  CHECK(info->State.Msgs == 1);

  natsMsg* raw_msg = nullptr;
  jsErrCode error = static_cast<jsErrCode>(0);
  REQUIRE(js_GetMsg(&raw_msg, js.get(), "FIXTURE", 1, nullptr, &error) == NATS_OK);
  Msg msg(raw_msg, &natsMsg_Destroy);
  CHECK(std::string(natsMsg_GetData(msg.get()), static_cast<std::size_t>(natsMsg_GetDataLength(msg.get()))) ==
        "survives");
  CHECK(publish(js.get(), "fixture.b", "after restart") == 2);
}

TEST_CASE("NatsServer stop() refuses connections; the destructor leaves no process behind") {
  int pid = -1;
  std::filesystem::path store;
  {
    nt::NatsServer nats;
    store = nats.store_dir();
    CHECK(std::filesystem::exists(store));
    const int stopped_pid = nats.pid();
    nats.stop();
    CHECK_FALSE(nats.running());
    CHECK(process_gone(stopped_pid));
    CHECK(connect(nats.url()).status != NATS_OK);
    // The log keeps what the server wrote, for failure messages.
    CHECK(std::filesystem::file_size(nats.log_file()) > 0);

    nats.start();
    CHECK(connect(nats.url()).status == NATS_OK);
    pid = nats.pid();
    REQUIRE(pid > 0);
    CHECK_FALSE(process_gone(pid));
  }
  CHECK(process_gone(pid));
  CHECK_FALSE(std::filesystem::exists(store));
}

TEST_CASE("NatsServer started from a thread that has ended keeps running") {
  // The orphan guard (PR_SET_PDEATHSIG) is tied to the forking thread; servers must not die
  // with a worker thread that started or restarted them.
  std::unique_ptr<nt::NatsServer> nats;
  std::thread([&] { nats = std::make_unique<nt::NatsServer>(); }).join();
  REQUIRE(nats != nullptr);
  std::this_thread::sleep_for(300ms);
  CHECK(nats->running());
  CHECK(connect(nats->url()).status == NATS_OK);

  std::thread([&] {
    nats->kill();
    nats->start();
  }).join();
  std::this_thread::sleep_for(300ms);
  CHECK(nats->running());
  CHECK(connect(nats->url()).status == NATS_OK);
}

TEST_CASE("NatsServer with user/password refuses a wrong password and accepts the right one") {
  nt::NatsServer::Options options;
  options.user = "alice";
  options.password = "s3cret";
  nt::NatsServer nats(options);

  CHECK(connect(nats.url()).status != NATS_OK);  // no credentials at all

  auto wrong = make_options(nats.url());
  REQUIRE(natsOptions_SetUserInfo(wrong.get(), "alice", "wrong") == NATS_OK);
  CHECK(connect(wrong.get()).status == NATS_CONNECTION_AUTH_FAILED);

  auto right = make_options(nats.url());
  REQUIRE(natsOptions_SetUserInfo(right.get(), "alice", "s3cret") == NATS_OK);
  auto connected = connect(right.get());
  REQUIRE(connected.status == NATS_OK);
  auto js = jetstream(connected.connection.get());
  CHECK(account_info_ok(js.get()));
}

TEST_CASE("NatsServer with a token refuses a wrong token and accepts the right one") {
  nt::NatsServer::Options options;
  options.token = "t0ken-for-tests";
  nt::NatsServer nats(options);

  CHECK(connect(nats.url()).status != NATS_OK);

  auto wrong = make_options(nats.url());
  REQUIRE(natsOptions_SetToken(wrong.get(), "not-the-token") == NATS_OK);
  CHECK(connect(wrong.get()).status == NATS_CONNECTION_AUTH_FAILED);

  auto right = make_options(nats.url());
  REQUIRE(natsOptions_SetToken(right.get(), "t0ken-for-tests") == NATS_OK);
  CHECK(connect(right.get()).status == NATS_OK);
}

TEST_CASE("NatsServer applies max_payload and extra_config") {
  nt::NatsServer::Options options;
  options.max_payload = 4096;
  options.extra_config = "max_connections: 1";
  nt::NatsServer nats(options);

  auto first = connect(nats.url());
  REQUIRE(first.status == NATS_OK);
  CHECK(natsConnection_GetMaxPayload(first.connection.get()) == 4096);
  CHECK(connect(nats.url()).status != NATS_OK);  // the second connection exceeds max_connections
}

TEST_CASE("NatsCluster of 3: R3 stream survives killing its leader; the node rejoins") {
  nt::NatsCluster cluster;
  REQUIRE(cluster.size() == 3);
  const auto urls = cluster.urls();
  REQUIRE(urls.size() == 3);
  CHECK(urls[0] != urls[1]);
  CHECK(urls[1] != urls[2]);
  CHECK(cluster.url() == urls[0] + "," + urls[1] + "," + urls[2]);

  natsOptions* raw_options = nullptr;
  REQUIRE(natsOptions_Create(&raw_options) == NATS_OK);
  Options options(raw_options, &natsOptions_Destroy);
  std::vector<const char*> servers;
  for (const auto& url : urls) servers.push_back(url.c_str());
  REQUIRE(natsOptions_SetServers(options.get(), servers.data(), 3) == NATS_OK);
  REQUIRE(natsOptions_SetMaxReconnect(options.get(), -1) == NATS_OK);  // keep trying other nodes
  REQUIRE(natsOptions_SetReconnectWait(options.get(), 100) == NATS_OK);
  auto connected = connect(options.get());
  REQUIRE(connected.status == NATS_OK);
  auto js = jetstream(connected.connection.get());
  CHECK(account_info_ok(js.get()));

  const auto created = add_stream(js.get(), "R3", "r3.>", 3);
  REQUIRE(created->Cluster != nullptr);
  CHECK(created->Cluster->ReplicasLen == 2);
  CHECK(publish(js.get(), "r3.a", "one") == 1);

  // Kill the node leading the stream: the worst case for a failover test.
  const auto before = stream_info(js.get(), "R3");
  REQUIRE(before != nullptr);
  REQUIRE(before->Cluster != nullptr);
  REQUIRE(before->Cluster->Leader != nullptr);
  const std::string old_leader = before->Cluster->Leader;
  int victim = -1;
  for (int i = 0; i < cluster.size(); ++i)
    if (cluster.node(i).server_name() == old_leader) victim = i;
  REQUIRE(victim >= 0);
  cluster.node(victim).kill();
  CHECK_FALSE(cluster.node(victim).running());

  // A new stream leader must be elected; bounded wait.
  uint64_t sequence = 0;
  const auto deadline = Clock::now() + 30s;
  while (sequence == 0 && Clock::now() < deadline) {
    sequence = publish(js.get(), "r3.b", "two");
    if (sequence == 0) std::this_thread::sleep_for(200ms);
  }
  CHECK(sequence == 2);
  const auto after = stream_info(js.get(), "R3");
  REQUIRE(after != nullptr);
  CHECK(after->State.Msgs == 2);
  REQUIRE(after->Cluster != nullptr);
  REQUIRE(after->Cluster->Leader != nullptr);
  CHECK(std::string(after->Cluster->Leader) != old_leader);

  const int port = cluster.node(victim).port();
  cluster.node(victim).start();
  CHECK(cluster.node(victim).running());
  CHECK(cluster.node(victim).port() == port);
  cluster.wait_until_ready();
}

TEST_CASE("PostgresServer starts, runs SQL, creates databases, and keeps data across restart") {
  int pid = -1;
  {
    nt::PostgresServer pg;
    pid = pg.pid();
    REQUIRE(pid > 0);
    if (::geteuid() == 0) {
      // PostgreSQL refuses root; the fixture must have switched to the postgres user.
      const passwd* user = ::getpwnam("postgres");
      REQUIRE(user != nullptr);
      CHECK(process_uid(pid) == static_cast<int>(user->pw_uid));
    }
    CHECK(pg.url() == "postgresql://postgres@127.0.0.1:" + std::to_string(pg.port()) + "/postgres");
    CHECK(pg.psql("select 1") == "1");
    CHECK_THROWS_AS(pg.psql("select * from no_such_table"), std::runtime_error);

    const auto url = pg.create_database("fixture_db");
    CHECK(url == pg.url("fixture_db"));
    CHECK(pg.create_database("fixture_db") == url);  // once: a second call does not fail
    pg.psql("create table kept (v text); insert into kept values ('before restart');", "fixture_db");
    CHECK(pg.psql("select current_database()", "fixture_db") == "fixture_db");

    // The url works for an independent client.
    const auto client = nt::run_command("psql -X -A -t -d '" + url + "' -c 'select count(*) from kept'", 30s);
    INFO(client.error);
    CHECK(client.status == 0);
    CHECK(client.output == "1\n");

    const int port = pg.port();
    pg.restart();
    CHECK(pg.port() == port);
    CHECK(pg.pid() != pid);
    CHECK(process_gone(pid));
    CHECK(pg.psql("select v from kept", "fixture_db") == "before restart");

    pg.stop();
    CHECK(pg.pid() == -1);
    CHECK_THROWS_AS(pg.psql("select 1"), std::runtime_error);
    pg.start();
    CHECK(pg.psql("select count(*) from kept", "fixture_db") == "1");
    pid = pg.pid();
  }
  CHECK(process_gone(pid));
}
