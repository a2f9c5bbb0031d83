// --server URL1,URL2: parsing, and moving to the next URL when one fails.
#include "agent/server_list.h"

#include <gtest/gtest.h>

#include "agent/device_api.h"
#include "agent/identity.h"

namespace outpost::agent {
namespace {

TEST(ServerListTest, ParsesOneOrSeveralUrlsAndDropsTrailingSlashes) {
  auto one = ServerList::parse("http://10.0.0.5:7400/");
  ASSERT_TRUE(one) << one.error().message;
  EXPECT_EQ(*one, std::vector<std::string>{"http://10.0.0.5:7400"});
  auto two = ServerList::parse("https://cp1:7400, https://cp2:7400");
  ASSERT_TRUE(two) << two.error().message;
  EXPECT_EQ(*two, (std::vector<std::string>{"https://cp1:7400", "https://cp2:7400"}));
}

TEST(ServerListTest, RefusesBadEntriesNamingThem) {
  for (const char* bad :
       {"", "cp1:7400", "ftp://cp1", "http://", "http://a,,http://b", "http://a,http://a/"}) {
    auto parsed = ServerList::parse(bad);
    ASSERT_FALSE(parsed) << bad;
    EXPECT_EQ(parsed.error().code, Errc::kInvalidArgument) << bad;
    EXPECT_EQ(parsed.error().field, "server") << bad;
  }
  auto twice = ServerList::parse("http://a,http://a/");
  EXPECT_NE(twice.error().message.find("given twice"), std::string::npos);
  auto scheme = ServerList::parse("http://a,cp2:7400");
  EXPECT_NE(scheme.error().message.find("\"cp2:7400\""), std::string::npos)
      << scheme.error().message;
}

TEST(ServerListTest, AFailureMovesOnOnceAndWrapsAround) {
  ServerList list({"http://a", "http://b", "http://c"});
  EXPECT_EQ(list.current(), "http://a");
  EXPECT_EQ(list.failed("http://a", "refused"), "http://b");
  // Another client that used a as well reports it late: b stays current.
  EXPECT_EQ(list.failed("http://a", "refused"), "http://b");
  EXPECT_EQ(list.failed("http://b", "503"), "http://c");
  EXPECT_EQ(list.failed("http://c", "timeout"), "http://a");
  EXPECT_EQ(list.failovers(), 3);
  ServerList single({"http://only"});
  EXPECT_EQ(single.failed("http://only", "refused"), "http://only");
  EXPECT_EQ(single.failovers(), 0);
}

TEST(ServerListTest, WorthFailoverOnlyForGatewayAndUnavailableAnswers) {
  for (int status : {502, 503, 504}) EXPECT_TRUE(worth_failover(status)) << status;
  for (int status : {200, 304, 400, 401, 403, 404, 409, 500}) {
    EXPECT_FALSE(worth_failover(status)) << status;
  }
}

TEST(ServerListTest, AnUnreachableServerMovesEveryClientOfTheIdentity) {
  // Port 1 on loopback refuses connections: the first request fails in transport.
  Identity id;
  id.server = "http://127.0.0.1:1,http://127.0.0.1:2";
  id.servers = std::make_shared<ServerList>(*ServerList::parse(id.server));
  Identity copy = id;  // the fetcher, the outbox, ... each hold a copy
  UpstreamClient client(id);
  auto first = client.request("GET", "/healthz", {}, {}, HttpRequestOptions{.timeout_ms = 2'000});
  ASSERT_FALSE(first);
  EXPECT_EQ(first.error().code, Errc::kUnavailable);
  EXPECT_EQ(client.url(), "http://127.0.0.1:1");
  EXPECT_EQ(copy.url(), "http://127.0.0.1:2");
  auto second = client.request("GET", "/healthz", {}, {}, HttpRequestOptions{.timeout_ms = 2'000});
  ASSERT_FALSE(second);
  EXPECT_EQ(client.url(), "http://127.0.0.1:2");
  EXPECT_EQ(copy.url(), "http://127.0.0.1:1");  // and round again
}

TEST(ServerListTest, ACancelledRequestIsNoReasonToMoveOn) {
  Identity id;
  id.server = "http://127.0.0.1:1,http://127.0.0.1:2";
  id.servers = std::make_shared<ServerList>(*ServerList::parse(id.server));
  std::atomic<bool> cancel{true};
  UpstreamClient client(id);
  HttpRequestOptions options;
  options.cancel = &cancel;
  options.timeout_ms = 2'000;
  auto answer = client.request("GET", "/healthz", {}, {}, options);
  ASSERT_FALSE(answer);
  EXPECT_EQ(id.url(), "http://127.0.0.1:1");
}

}  // namespace
}  // namespace outpost::agent
