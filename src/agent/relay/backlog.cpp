#include "agent/relay/backlog.h"

#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/durable_file.h"

namespace outpost::agent::relay {
namespace {

// A file is one line of JSON (everything but the body), a newline, then the body's bytes.
std::string encode(const BacklogEntry& e) {
  nlohmann::json head = {{"id", e.id},
                         {"device", e.device},
                         {"path", e.path},
                         {"content_type", e.content_type},
                         {"content_encoding", e.content_encoding},
                         {"authorization", e.authorization},
                         {"signature", e.signature},
                         {"via", e.via},
                         {"body_bytes", e.body.size()}};
  std::string out = head.dump();
  out += '\n';
  out += e.body;
  return out;
}

Result<BacklogEntry> decode(const std::string& text, const std::string& name) {
  auto newline = text.find('\n');
  auto bad = [&](const std::string& why) { return make_error(Errc::kIo, name + ": " + why); };
  if (newline == std::string::npos) return bad("no header line");
  auto head = nlohmann::json::parse(text.substr(0, newline), nullptr, false);
  if (!head.is_object()) return bad("header is not JSON");
  BacklogEntry e;
  try {
    e.id = head.at("id").get<uint64_t>();
    e.device = head.at("device").get<std::string>();
    e.path = head.at("path").get<std::string>();
    e.content_type = head.at("content_type").get<std::string>();
    e.content_encoding = head.at("content_encoding").get<std::string>();
    e.authorization = head.at("authorization").get<std::string>();
    e.signature = head.value("signature", "");  // entries of relays before signing
    e.via = head.at("via").get<std::string>();
    const auto size = head.at("body_bytes").get<size_t>();
    if (text.size() - newline - 1 != size) return bad("body is truncated");
  } catch (const std::exception& ex) {
    return bad(std::string("header: ") + ex.what());
  }
  e.body = text.substr(newline + 1);
  return e;
}

}  // namespace

Backlog::Backlog(std::string dir, int64_t limit_bytes)
    : dir_(std::move(dir)), limit_bytes_(limit_bytes) {}

std::string Backlog::file_of(uint64_t id) const {
  char name[32];
  std::snprintf(name, sizeof(name), "%020" PRIu64 ".req", id);
  return dir_ + "/" + name;
}

Status Backlog::load() {
  OUTPOST_TRY(make_dirs(dir_, 0700));
  std::vector<std::string> names;
  for (auto& name : list_directory(dir_)) {
    if (name.size() == 24 && name.ends_with(".req")) {
      names.push_back(name);
    } else if (name.find(".tmp") != std::string::npos) {
      ::unlink((dir_ + "/" + name).c_str());  // a write that never completed
    }
  }
  std::sort(names.begin(), names.end());  // zero-padded: name order is arrival order
  std::lock_guard lock(mu_);
  for (const auto& name : names) {
    const std::string path = dir_ + "/" + name;
    auto text = read_file(path);
    auto entry = text ? decode(*text, path) : Result<BacklogEntry>(make_error(text.error()));
    if (!entry) {
      spdlog::error("relay backlog: {}; set aside as .bad", entry.error().message);
      std::rename(path.c_str(), (path + ".bad").c_str());
      ++unreadable_;
      continue;
    }
    const auto bytes = static_cast<int64_t>(text->size());
    queues_[entry->device].push_back({entry->id, bytes});
    bytes_ += bytes;
    ++entries_;
    next_id_ = std::max(next_id_, entry->id + 1);
  }
  return {};
}

Status Backlog::push(BacklogEntry entry) {
  uint64_t id = 0;
  const auto bytes = static_cast<int64_t>(entry.body.size() + 512);
  {
    std::lock_guard lock(mu_);
    if (bytes_ + bytes > limit_bytes_) {
      return make_error(Errc::kUnavailable,
                        "the relay's backlog is full (" + std::to_string(bytes_) + " of " +
                            std::to_string(limit_bytes_) +
                            " bytes) while its upstream catches up; keep the upload and retry");
    }
    id = next_id_++;
    bytes_ += bytes;  // booked now so concurrent pushes cannot pass the limit together
  }
  entry.id = id;
  const std::string text = encode(entry);
  if (auto written = write_file_durably(file_of(id), text, 0600); !written) {
    std::lock_guard lock(mu_);
    bytes_ -= bytes;
    return written;
  }
  std::lock_guard lock(mu_);
  bytes_ += static_cast<int64_t>(text.size()) - bytes;
  auto& queue = queues_[entry.device];
  // Ids are booked before the write; keep each device's queue in id order even when two
  // uploads of one device race (the agent sends one at a time, so this is rare).
  Item item{id, static_cast<int64_t>(text.size())};
  queue.insert(std::upper_bound(queue.begin(), queue.end(), item,
                                [](const Item& a, const Item& b) { return a.id < b.id; }),
               item);
  ++entries_;
  return {};
}

Result<std::optional<BacklogEntry>> Backlog::front(const std::string& device) const {
  uint64_t id = 0;
  {
    std::lock_guard lock(mu_);
    auto it = queues_.find(device);
    if (it == queues_.end() || it->second.empty()) return std::optional<BacklogEntry>();
    id = it->second.front().id;
  }
  const std::string path = file_of(id);
  auto text = read_file(path);
  if (!text) return make_error(text.error());
  auto entry = decode(*text, path);
  if (!entry) return make_error(entry.error());
  return std::optional<BacklogEntry>(std::move(*entry));
}

void Backlog::pop(const std::string& device) {
  std::lock_guard lock(mu_);
  auto it = queues_.find(device);
  if (it == queues_.end() || it->second.empty()) return;
  const Item item = it->second.front();
  it->second.pop_front();
  if (it->second.empty()) queues_.erase(it);
  ::unlink(file_of(item.id).c_str());
  bytes_ -= item.bytes;
  --entries_;
}

std::vector<std::string> Backlog::devices() const {
  std::lock_guard lock(mu_);
  std::vector<std::pair<uint64_t, std::string>> order;
  for (const auto& [device, queue] : queues_) order.emplace_back(queue.front().id, device);
  std::sort(order.begin(), order.end());
  std::vector<std::string> out;
  for (auto& [id, device] : order) out.push_back(std::move(device));
  return out;
}

Backlog::Stats Backlog::stats() const {
  std::lock_guard lock(mu_);
  return {entries_, bytes_, limit_bytes_, unreadable_};
}

}  // namespace outpost::agent::relay
