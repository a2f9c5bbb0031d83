// `outpost apply -f MANIFEST`: create or update a deployment (a new revision on real change).
#include <iostream>

#include "cli/cli.h"
#include "common/durable_file.h"

namespace outpost::cli {

void add_apply_command(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto file = std::make_shared<std::string>();
  auto force = std::make_shared<bool>(false);
  auto* apply =
      app.add_subcommand("apply", "Create or update a deployment from a manifest (YAML or JSON)");
  apply->add_option("-f,--file", *file, "Manifest file ('-' reads standard input)")->required();
  apply->add_flag("--force", *force,
                  "Apply a spec even though a revision with it was rolled back before");
  apply->footer(
      "Example: outpost apply -f examples/defect-detector.yaml\n"
      "Re-applying an unchanged manifest keeps the revision; any real change makes a new one,\n"
      "which moves to the devices in the waves of spec.rollout (outpost rollout status NAME).");
  apply->callback([&options, &exit_code, file, force] {
    Session session(options);
    std::string text;
    if (*file == "-") {
      text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    } else {
      auto read = read_file(*file);
      if (!read) {
        exit_code = session.fail(read.error());
        return;
      }
      text = *read;
    }
    auto result =
        session.call("POST", std::string("/api/v1/deployments") + (*force ? "?force=true" : ""),
                     text, "application/yaml");
    if (!result) {
      exit_code = session.fail(result.error().with_context(*file == "-" ? "<stdin>" : *file));
      return;
    }
    if (session.json_output()) {
      session.print_json(*result);
    } else {
      const auto& r = *result;
      std::cout << "deployment " << r["name"].get<std::string>() << " "
                << (r["changed"].get<bool>()
                        ? (r["revision"].get<int64_t>() == 1 ? "created" : "updated")
                        : "unchanged")
                << " (revision " << r["revision"].get<int64_t>() << ")\n";
      if (r.contains("devices")) {
        std::cout << "  devices: " << r["devices"]["targeted"] << " targeted of "
                  << r["devices"]["total"];
        if (r["devices"]["unschedulable"].get<int64_t>() > 0) {
          std::cout << ", " << r["devices"]["unschedulable"]
                    << " unschedulable (see 'outpost deployment show "
                    << r["name"].get<std::string>() << "')";
        }
        std::cout << "\n";
      }
      if (r.contains("rollout_status")) {
        std::cout << "  rollout " << r["rollout"] << ": " << r["rollout_status"]["devices"]
                  << " devices in " << r["rollout_status"]["waves"] << " wave(s), "
                  << r["rollout_status"]["state"].get<std::string>() << " (outpost rollout status "
                  << r["name"].get<std::string>() << ")\n";
      }
    }
    exit_code = kExitOk;
  });
}

}  // namespace outpost::cli
