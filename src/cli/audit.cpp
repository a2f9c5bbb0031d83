// `outpost audit list|verify`: the hash-chained change log.
#include <iostream>

#include "cli/cli.h"
#include "common/clock.h"

namespace outpost::cli {

void add_audit_commands(CLI::App& app, GlobalOptions& options, int& exit_code) {
  auto* audit = app.add_subcommand("audit", "The audit log of every change");
  audit->require_subcommand(1);

  auto since = std::make_shared<std::string>("24h");
  auto* list = audit->add_subcommand("list", "List audit entries, oldest first");
  list->add_option("--since", *since, "How far back (default 24h; e.g. 30m, 7d)");
  list->callback([&options, &exit_code, since] {
    Session session(options);
    auto result = session.fetch("/api/v1/audit?since=" + url_encode(*since), exit_code, "entries");
    if (!result) return;
    Table table({"SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "HASH"});
    for (const auto& e : (*result)["entries"]) {
      table.add({std::to_string(e["seq"].get<int64_t>()), format_iso8601(e["time"].get<int64_t>()),
                 e["actor"], e["action"], e["target"], e["hash"].get<std::string>().substr(0, 12)});
    }
    std::cout << table.render();
    exit_code = kExitOk;
  });

  auto* verify = audit->add_subcommand("verify", "Check the hash chain; says where it breaks");
  verify->callback([&options, &exit_code] {
    Session session(options);
    auto result = session.call("GET", "/api/v1/audit/verify");
    if (!result) {
      exit_code = session.fail(result.error());
      return;
    }
    bool good = (*result)["ok"].get<bool>();
    if (session.json_output()) {
      session.print_json(*result);
    } else if (good) {
      std::cout << "audit log intact: " << (*result)["entries"] << " entries\n";
    } else {
      std::cout << "audit log BROKEN: " << (*result)["message"].get<std::string>() << "\n";
    }
    exit_code = good ? kExitOk : kExitError;
  });
}

}  // namespace outpost::cli
