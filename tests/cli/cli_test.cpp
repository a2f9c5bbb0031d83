// The CLI reads the server's answers for display without ever throwing, and run_cli turns an
// exception a verb lets escape into an error and an exit code instead of an abort.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cli/cli.h"

namespace outpost::cli {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

TEST(CliAnswers, ReadsFieldsOfAnyTypeWithoutThrowing) {
  const json doc = {{"s", "text"},  {"n", 42},     {"f", 2.5},        {"b", true},
                    {"z", nullptr}, {"a", {1, 2}}, {"o", {{"k", 1}}}, {"huge", 1e300}};
  EXPECT_EQ(text_of(doc, "s"), "text");
  EXPECT_EQ(text_of(doc, "n"), "42");
  EXPECT_EQ(text_of(doc, "z"), "");
  EXPECT_EQ(text_of(doc, "a"), "");
  EXPECT_EQ(text_of(doc, "missing"), "");
  EXPECT_EQ(int_of(doc, "n"), 42);
  EXPECT_EQ(int_of(doc, "f"), 2);
  EXPECT_EQ(int_of(doc, "z", -1), -1);
  EXPECT_EQ(int_of(doc, "s", -1), -1);
  EXPECT_EQ(int_of(doc, "huge", -1), -1);
  EXPECT_EQ(list_of(doc, "a").size(), 2u);
  EXPECT_TRUE(list_of(doc, "o").empty());
  EXPECT_TRUE(object_of(doc, "a").empty());
  EXPECT_EQ(object_of(doc, "o").size(), 1u);
  // Not an object at all.
  for (const json& odd : {json(nullptr), json(3), json::array({1}), json("x")}) {
    EXPECT_EQ(text_of(odd, "s"), "");
    EXPECT_EQ(int_of(odd, "n", 7), 7);
    EXPECT_TRUE(list_of(odd, "a").is_array());
    EXPECT_TRUE(object_of(odd, "o").is_object());
  }
}

TEST(CliAnswers, PushSummaryOfAModelWithoutADefaultDomainOpset) {
  // What the server answers for node/test_adam_multiple: the CLI aborted on "opset": null.
  const json answer = json::parse(R"({"created":true,"variants":[{"selector":{"accelerator":"cpu"},
      "artifact":"sha256:ab","metadata":{"opset":null,"opsets":[{"domain":"ai.onnx.preview.training",
      "version":1}],"inputs":[{"name":"r"},{"name":"t"}],"outputs":[{"name":"x"}]}}]})");
  const std::string text = describe_pushed_version("adam", "1.0.0", answer);
  EXPECT_THAT(text, HasSubstr("model adam 1.0.0 pushed\n"));
  EXPECT_THAT(text, HasSubstr("sha256:ab  onnx, no ai.onnx opset (ai.onnx.preview.training 1), "
                              "inputs 2, outputs 1"));
  const json plain =
      json::parse(R"({"created":false,"variants":[{"selector":{},"artifact":"sha256:cd",
      "metadata":{"opset":13,"inputs":[{}],"outputs":[{}]}}]})");
  EXPECT_THAT(describe_pushed_version("m", "2.0.0", plain),
              HasSubstr("unchanged (already pushed with the same content)\n  variant {}  "
                        "sha256:cd  onnx opset 13, inputs 1, outputs 1\n"));
  // Answers of the wrong shape give a summary, not an exception.
  for (const char* odd : {"null", "[]", "3", R"({"variants":{"a":1}})",
                          R"({"variants":[null,3,{"metadata":[1],"selector":"x"}]})"}) {
    EXPECT_THAT(describe_pushed_version("m", "1", json::parse(odd)), HasSubstr("model m 1")) << odd;
  }
}

TEST(CliExit, AnExceptionFromAVerbIsAnErrorAndExitCodeNotAnAbort) {
  for (bool as_json : {false, true}) {
    CLI::App app{"test"};
    GlobalOptions options;
    options.output = as_json ? "json" : "table";
    int exit_code = 0;
    auto* verb = app.add_subcommand("show", "");
    verb->callback([] {
      const json answer = {{"opset", nullptr}};
      (void)answer["opset"].get<int>();  // type_error.302, as the old model push hit
    });
    const char* argv[] = {"outpost", "show"};
    ::testing::internal::CaptureStderr();
    const int rc = run_cli(app, 2, const_cast<char**>(argv), options, exit_code);
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_EQ(rc, kExitBadAnswer);
    EXPECT_THAT(err, HasSubstr("the server's answer is not what this CLI expects"));
    EXPECT_THAT(err, HasSubstr("type must be number, but is null"));
    if (as_json) {
      EXPECT_THAT(err, HasSubstr(R"("error":{"code")"));
    }
  }
  // A usage error stays a usage error; a verb's own exit code passes through.
  CLI::App app{"test"};
  GlobalOptions options;
  int exit_code = 0;
  app.add_subcommand("ok", "")->callback([&exit_code] { exit_code = kExitError; });
  const char* bad[] = {"outpost", "--no-such-flag"};
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(run_cli(app, 2, const_cast<char**>(bad), options, exit_code), kExitUsage);
  ::testing::internal::GetCapturedStderr();
  const char* good[] = {"outpost", "ok"};
  EXPECT_EQ(run_cli(app, 2, const_cast<char**>(good), options, exit_code), kExitError);
}

}  // namespace
}  // namespace outpost::cli
