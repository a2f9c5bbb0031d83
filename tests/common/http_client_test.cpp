// HttpClient against the project's own HTTP server on a free loopback port.
#include "common/http_client.h"

#include <gtest/gtest.h>

#include "http/http_server.h"

namespace outpost {
namespace {

TEST(HttpClientTest, CountsTheBytesOfEachExchange) {
  http::Router router;
  router.add("POST", "/echo-size", [](http::Request&& request, http::Responder respond) {
    respond(http::Response::text(200, std::string(request.body.size() / 2, 'r')));
  });
  http::ServerOptions options;
  options.listen = "127.0.0.1:0";
  http::HttpServer server(options, router);
  ASSERT_TRUE(server.start().has_value());
  HttpClient client("http://127.0.0.1:" + std::to_string(server.port()), "secret-token");
  for (size_t size : {size_t{0}, size_t{1000}, size_t{100'000}}) {
    HttpRequestOptions counted;
    counted.count_bytes = true;
    auto r =
        client.request("POST", "/echo-size", std::string(size, 'b'), "application/zstd", counted);
    ASSERT_TRUE(r.has_value()) << r.error().describe();
    ASSERT_EQ(r->status, 200);
    ASSERT_EQ(r->body.size(), size / 2);
    // Body plus a request line and headers (host, bearer, content type and length: under
    // 400 bytes), counted once.
    EXPECT_GT(r->bytes_sent, size + 60) << size;
    EXPECT_LT(r->bytes_sent, size + 400) << size;
    EXPECT_GT(r->bytes_received, size / 2 + 30) << size;
    EXPECT_LT(r->bytes_received, size / 2 + 400) << size;
  }
  auto uncounted = client.request("POST", "/echo-size", "abc", "application/zstd");
  ASSERT_TRUE(uncounted.has_value());
  EXPECT_EQ(uncounted->bytes_sent, 0u);  // counting is asked for, not paid by every call
  server.stop();
}

}  // namespace
}  // namespace outpost
