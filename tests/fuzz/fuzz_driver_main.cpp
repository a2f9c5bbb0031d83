// Stand-in for libFuzzer's main where the compiler has none (g++): runs the fuzz target over
// every file of the given corpus folders (or single files), then over deterministic
// mutations of each: bit flips, truncations, byte overwrites, insertions and deletions.
// Usage: <target> <dir or file>... [--mutations N]   (N per file, default 2000)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(next() % n); }
};

void run(const std::string& bytes) {
  // A copy sized exactly, so ASan catches any read past the end.
  std::vector<uint8_t> copy(bytes.begin(), bytes.end());
  LLVMFuzzerTestOneInput(copy.data(), copy.size());
}

std::string mutate(const std::string& seed, SplitMix64& rng) {
  static const unsigned char kInteresting[] = {0x00, 0x01, 0x02, 0x07, 0x08, 0x0a, 0x12,
                                               0x3a, 0x42, 0x5a, 0x62, 0x7f, 0x80, 0xff};
  std::string out = seed;
  const size_t edits = 1 + rng.below(4);
  for (size_t e = 0; e < edits; ++e) {
    switch (rng.below(6)) {
      case 0:  // flip one bit
        if (!out.empty()) {
          auto& byte = out[rng.below(out.size())];
          byte = static_cast<char>(static_cast<unsigned char>(byte) ^ (1u << rng.below(8)));
        }
        break;
      case 1:  // truncate
        out.resize(rng.below(out.size() + 1));
        break;
      case 2:  // overwrite a byte with a value that matters to the wire format
        if (!out.empty()) {
          out[rng.below(out.size())] =
              static_cast<char>(kInteresting[rng.below(sizeof(kInteresting))]);
        }
        break;
      case 3: {  // insert random bytes
        std::string bytes(1 + rng.below(8), '\0');
        for (auto& byte : bytes) byte = static_cast<char>(rng.next());
        out.insert(rng.below(out.size() + 1), bytes);
        break;
      }
      case 4: {  // delete a range
        const size_t at = rng.below(out.size() + 1);
        out.erase(at, rng.below(16));
        break;
      }
      default: {  // duplicate a range in place
        const size_t at = rng.below(out.size() + 1);
        const std::string piece = out.substr(at, rng.below(32));
        out.insert(rng.below(out.size() + 1), piece);
        break;
      }
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string name = std::filesystem::path(argv[0]).filename().string();
  size_t mutations = 2000;
  std::vector<std::filesystem::path> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--mutations" && i + 1 < argc) {
      mutations = std::strtoull(argv[++i], nullptr, 10);
      continue;
    }
    std::error_code ec;
    if (std::filesystem::is_directory(arg, ec)) {
      for (const auto& entry : std::filesystem::directory_iterator(arg, ec)) {
        if (entry.is_regular_file()) files.push_back(entry.path());
      }
    } else if (std::filesystem::is_regular_file(arg, ec)) {
      files.emplace_back(arg);
    } else {
      std::fprintf(stderr, "%s: %s is neither a file nor a folder\n", name.c_str(), arg.c_str());
      return 2;
    }
  }
  if (files.empty()) {
    std::fprintf(stderr, "usage: %s <corpus dir or file>... [--mutations N]\n", name.c_str());
    return 2;
  }
  std::sort(files.begin(), files.end());

  size_t runs = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    std::ifstream in(files[f], std::ios::binary);
    const std::string seed((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    run(seed);
    ++runs;
    SplitMix64 rng{0x6f6e6e78u + f};
    for (size_t m = 0; m < mutations; ++m, ++runs) run(mutate(seed, rng));
  }
  std::printf("%s: %zu inputs from %zu corpus files, no crash\n", name.c_str(), runs, files.size());
  return 0;
}
