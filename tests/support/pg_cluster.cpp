// See pg_cluster.h.
#include "pg_cluster.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

namespace outpost::testing_support {
namespace {

namespace fs = std::filesystem;

bool has_server_programs(const fs::path& dir) {
  std::error_code ec;
  return fs::exists(dir / "initdb", ec) && fs::exists(dir / "pg_ctl", ec) &&
         fs::exists(dir / "postgres", ec);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The account the server runs as: ours, or when we are root (initdb and postgres refuse root)
// the "postgres" account Debian's package makes, else "nobody".
struct Account {
  bool switch_user = false;
  uid_t uid = 0;
  gid_t gid = 0;
};

Result<Account> server_account() {
  Account account;
  if (::geteuid() != 0) return account;
  for (const char* name : {"postgres", "nobody"}) {
    if (const passwd* pw = ::getpwnam(name)) {
      account.switch_user = true;
      account.uid = pw->pw_uid;
      account.gid = pw->pw_gid;
      return account;
    }
  }
  return make_error(Errc::kUnavailable,
                    "running as root and there is neither a postgres nor a nobody account to run "
                    "PostgreSQL as");
}

// Runs a PostgreSQL program to completion as `account`, stdin from /dev/null, stdout and stderr
// appended to `log` (so that no pipe of ours, CTest's included, stays open in a server it
// leaves running). Returns its exit status (-1 when it could not run).
int run_as(const Account& account, const std::vector<std::string>& argv, const std::string& log) {
  std::vector<std::string> copy = argv;
  std::vector<char*> args;
  for (auto& a : copy) args.push_back(a.data());
  args.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    // Only async-signal-safe calls from here to exec.
    const int in = ::open("/dev/null", O_RDONLY);
    const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (in < 0 || out < 0) ::_exit(126);
    ::dup2(in, 0);
    ::dup2(out, 1);
    ::dup2(out, 2);
    if (account.switch_user && (::setgroups(0, nullptr) != 0 || ::setgid(account.gid) != 0 ||
                                ::setuid(account.uid) != 0)) {
      ::_exit(126);
    }
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

void chown_tree(const fs::path& dir, const Account& account) {
  if (!account.switch_user) return;
  (void)::chown(dir.c_str(), account.uid, account.gid);
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    (void)::lchown(it->path().c_str(), account.uid, account.gid);
  }
}

std::string log_tail(const std::string& log) {
  std::string text = slurp(log);
  if (text.size() > 2000) text = "..." + text.substr(text.size() - 2000);
  return text;
}

}  // namespace

std::string find_pg_bindir() {
  if (const char* env = std::getenv("OUTPOST_PG_BINDIR"); env != nullptr && *env != '\0') {
    return has_server_programs(env) ? std::string(env) : std::string();
  }
  std::vector<std::pair<int, fs::path>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    if (has_server_programs(entry.path() / "bin"))
      found.emplace_back(std::stoi(name), entry.path() / "bin");
  }
  if (!found.empty()) return std::max_element(found.begin(), found.end())->second.string();
  if (const char* path = std::getenv("PATH")) {
    std::stringstream dirs(path);
    std::string dir;
    while (std::getline(dirs, dir, ':')) {
      if (!dir.empty() && has_server_programs(dir)) return dir;
    }
  }
  return {};
}

Result<std::unique_ptr<PgCluster>> PgCluster::start(const std::string& dir_text) {
  const std::string bindir = find_pg_bindir();
  if (bindir.empty()) {
    return make_error(Errc::kUnavailable,
                      "PostgreSQL's initdb, pg_ctl and postgres were not found (in "
                      "/usr/lib/postgresql/*/bin, $OUTPOST_PG_BINDIR or the PATH); install "
                      "Debian's postgresql package (scripts/install-deps does)");
  }
  auto account = server_account();
  if (!account) return make_error(std::move(account).error());
  stop_dir(dir_text);
  const fs::path dir = fs::absolute(dir_text);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return make_error(Errc::kIo, "creating " + dir.string() + ": " + ec.message());
  chown_tree(dir, *account);
  const std::string data = (dir / "data").string();
  // Ours (initdb, pg_ctl), opened before switching user; the server's own log is written by
  // the server's account.
  const std::string log = (dir / "tools.log").string();
  const std::string server_log = (dir / "server.log").string();

  // en_US.UTF-8 when the machine has it, so that a query that forgets COLLATE "C" sorts
  // differently from SQLite and fails a test; C otherwise.
  int rc = -1;
  for (const char* locale : {"en_US.UTF-8", "C"}) {
    fs::remove_all(data, ec);
    rc = run_as(*account,
                {bindir + "/initdb", "-D", data, "-A", "trust", "-U", "outpost", "-E", "UTF8",
                 std::string("--locale=") + locale, "--no-sync"},
                log);
    if (rc == 0) break;
  }
  if (rc != 0) {
    auto failed = make_error(Errc::kUnavailable,
                             "initdb failed (exit " + std::to_string(rc) + "):\n" + log_tail(log));
    fs::remove_all(dir, ec);
    return failed;
  }
  // A free port can be taken between our probe and the server's bind: try a few.
  for (int attempt = 0; attempt < 5; ++attempt) {
    const uint16_t port = free_port();
    if (port == 0) continue;
    rc = run_as(*account,
                {bindir + "/pg_ctl", "-D", data, "-l", server_log, "-w", "-t", "60", "-o",
                 "-k " + dir.string() + " -p " + std::to_string(port) +
                     " -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
                     " -c full_page_writes=off -c max_connections=200",
                 "start"},
                log);
    if (rc == 0) {
      std::ofstream(dir / "port") << port << "\n";
      std::ofstream(dir / "bindir") << bindir << "\n";
      return std::unique_ptr<PgCluster>(new PgCluster(dir.string(), port, /*owned=*/true));
    }
  }
  auto failed = make_error(Errc::kUnavailable, "pg_ctl start failed (exit " + std::to_string(rc) +
                                                   "):\n" + log_tail(log) + log_tail(server_log));
  stop_dir(dir.string());
  return failed;
}

Result<std::unique_ptr<PgCluster>> PgCluster::attach(const std::string& dir) {
  const std::string text = slurp(dir + "/port");
  const int port = std::atoi(text.c_str());
  if (port <= 0 || port > 65535) {
    const std::string skip = slurp(dir + "/skip");
    return make_error(Errc::kUnavailable, skip.empty() ? "no PostgreSQL test cluster in " + dir +
                                                             " (the pg_cluster fixture did not run)"
                                                       : skip);
  }
  return std::unique_ptr<PgCluster>(
      new PgCluster(dir, static_cast<uint16_t>(port), /*owned=*/false));
}

void PgCluster::stop_dir(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  std::string bindir = slurp(dir + "/bindir");
  while (!bindir.empty() && (bindir.back() == '\n' || bindir.back() == ' ')) bindir.pop_back();
  if (bindir.empty()) bindir = find_pg_bindir();
  if (!bindir.empty() && fs::exists(dir + "/data/postmaster.pid", ec)) {
    auto account = server_account();
    if (account) {
      (void)run_as(*account,
                   {bindir + "/pg_ctl", "-D", dir + "/data", "-m", "immediate", "-w", "stop"},
                   "/dev/null");
    }
  }
  fs::remove_all(dir, ec);
}

PgCluster::~PgCluster() {
  std::vector<std::string> databases;
  {
    std::lock_guard lock(mu_);
    databases.swap(databases_);
  }
  if (!owned_) {
    // The cluster outlives us: leave no database behind (FORCE: a server a test left running).
    for (const auto& db : databases) (void)admin("DROP DATABASE IF EXISTS " + db + " WITH (FORCE)");
  } else {
    stop_dir(dir_);
  }
}

std::string PgCluster::url(const std::string& db) const {
  return "postgres://outpost@127.0.0.1:" + std::to_string(port_) + "/" + db;
}

Status PgCluster::admin(const std::string& sql) {
  PGconn* conn = PQconnectdb(url("postgres").c_str());
  std::unique_ptr<PGconn, decltype(&PQfinish)> guard(conn, &PQfinish);
  if (PQstatus(conn) != CONNECTION_OK) {
    return make_error(Errc::kUnavailable, "connecting to the test cluster on port " +
                                              std::to_string(port_) + ": " + PQerrorMessage(conn));
  }
  std::unique_ptr<PGresult, decltype(&PQclear)> res(PQexec(conn, sql.c_str()), &PQclear);
  if (PQresultStatus(res.get()) != PGRES_COMMAND_OK) {
    return make_error(Errc::kInternal, sql + ": " + PQerrorMessage(conn));
  }
  return ok();
}

Result<std::string> PgCluster::create_database() {
  std::string name;
  {
    std::lock_guard lock(mu_);
    name = "t_" + std::to_string(::getpid()) + "_" + std::to_string(++next_);
  }
  // template0: never connected to, so concurrent CREATE DATABASEs do not wait on each other.
  OUTPOST_TRY(admin("CREATE DATABASE " + name + " TEMPLATE template0 ENCODING 'UTF8'"));
  {
    std::lock_guard lock(mu_);
    databases_.push_back(name);
  }
  return url(name);
}

PgCluster* test_cluster(std::string* why) {
  // Made once; destroyed at exit (dropping our databases, or stopping our private cluster).
  static std::mutex mu;
  static std::unique_ptr<PgCluster> cluster;
  static std::string reason;
  static bool tried = false;
  std::lock_guard lock(mu);
  if (!tried) {
    tried = true;
    const char* fixture = std::getenv("OUTPOST_TEST_PG_DIR");
    Result<std::unique_ptr<PgCluster>> made =
        fixture != nullptr && *fixture != '\0'
            ? PgCluster::attach(fixture)
            : PgCluster::start(
                  (fs::temp_directory_path() / ("outpost-pg-" + std::to_string(::getpid())))
                      .string());
    if (made) {
      cluster = std::move(*made);
    } else {
      reason = made.error().message;
    }
  }
  if (cluster == nullptr && why != nullptr) *why = reason;
  return cluster.get();
}

}  // namespace outpost::testing_support
