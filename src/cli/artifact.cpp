// `outpost artifact push|list`: content-addressed blobs (models, app bundles).
#include <iostream>

#include "cli/cli.h"
#include "common/units.h"

namespace outpost::cli {

void add_artifact_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* artifact = app.add_subcommand("artifact", "Content-addressed artifacts");
  artifact->require_subcommand(1);

  auto files = std::make_shared<std::vector<std::string>>();
  auto* push =
      artifact->add_subcommand("push", "Upload files; prints each one's sha256:<hex> digest");
  push->add_option("FILE", *files, "Files to upload")->required()->check(CLI::ExistingFile);
  push->callback([&options, &exit_code, files] {
    Session session(options);
    nlohmann::json all = nlohmann::json::array();
    for (const auto& file : *files) {
      auto result = session.upload("/api/v1/artifacts", file);
      if (!result) {
        exit_code = session.fail(result.error().with_context("pushing " + file));
        return;
      }
      (*result)["file"] = file;
      all.push_back(*result);
      if (!session.json_output()) std::cout << (*result)["digest"].get<std::string>() << "\n";
    }
    if (session.json_output()) session.print_json(files->size() == 1 ? all[0] : all);
    exit_code = kExitOk;
  });

  auto* list = artifact->add_subcommand("list", "List stored artifacts");
  list->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.fetch("/api/v1/artifacts", exit_code, "artifacts");
    if (!result) return;
    Table table({"DIGEST", "SIZE", "TYPE", "PUSHED"});
    for (const auto& a : (*result)["artifacts"]) {
      table.add({a["digest"], format_size(a["size"].get<int64_t>()), a["media_type"],
                 ago(a["created_at"].get<int64_t>(), now_ms())});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });
}

}  // namespace outpost::cli
