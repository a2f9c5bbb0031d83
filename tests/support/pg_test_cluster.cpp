// The CTest fixture around the PostgreSQL test cluster (pg_cluster.h):
//   pg_test_cluster start DIR   starts one in DIR and leaves it running (DIR/port says where);
//                               without PostgreSQL installed it writes the reason to DIR/skip
//                               and succeeds, so that the postgres cases skip rather than fail
//   pg_test_cluster stop DIR    stops it and removes DIR
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "pg_cluster.h"

int main(int argc, char** argv) {
  using outpost::testing_support::PgCluster;
  const std::string verb = argc == 3 ? argv[1] : "";
  if (verb != "start" && verb != "stop") {
    std::fprintf(stderr, "usage: pg_test_cluster start|stop DIR\n");
    return 2;
  }
  const std::string dir = argv[2];
  if (verb == "stop") {
    PgCluster::stop_dir(dir);
    return 0;
  }
  if (outpost::testing_support::find_pg_bindir().empty()) {
    PgCluster::stop_dir(dir);
    std::filesystem::create_directories(dir);
    const std::string why =
        "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin); "
        "scripts/install-deps installs it";
    std::ofstream(dir + "/skip") << why;
    std::printf("%s: the postgres tests will be skipped\n", why.c_str());
    return 0;
  }
  auto cluster = PgCluster::start(dir);
  if (!cluster) {
    std::fprintf(stderr, "starting the PostgreSQL test cluster in %s: %s\n", dir.c_str(),
                 cluster.error().message.c_str());
    return 1;
  }
  (*cluster)->keep_running();
  std::printf("PostgreSQL test cluster in %s on 127.0.0.1:%u\n", dir.c_str(),
              static_cast<unsigned>((*cluster)->port()));
  return 0;
}
