// gemma4-spec: the native runner's command line (make native; make generate BACKEND=native).
//   gemma4-spec --pte pair.pte --prompt-ids 2,15,300 [--max-new-tokens 64] [--draft-tokens 0]
//               [--ignore-eos] [--prefill-chunk 256] [--no-shared-arenas] [--memory]
// Streams each new token id on its own line, then one JSON line of statistics (the fields of
// `make generate JSON=1`'s stats; with --memory, Linux only, also the process's peak and
// current resident bytes and how many of them are pages of the memory-mapped program file).
// Exit 2 on bad input, 1 on a refused or failed run.

#include "gemma4_spec.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

int usage(const char* msg) {
  std::fprintf(stderr, "error: %s\nusage: gemma4-spec --pte FILE --prompt-ids 1,2,3 [--max-new-tokens N] "
                       "[--draft-tokens K] [--ignore-eos] [--prefill-chunk N] [--no-shared-arenas] [--memory]\n", msg);
  return 2;
}

bool parse_int(const char* s, long long& out) {
  char* end = nullptr;
  out = std::strtoll(s, &end, 10);
  return end && *end == '\0' && end != s;
}

int print_token(int64_t token, void*) {
  std::printf("%lld\n", static_cast<long long>(token));
  std::fflush(stdout);
  return 0;
}

// kB fields of /proc/self/status, in bytes (-1 where absent: not Linux)
long long status_bytes(const char* field) {
  std::ifstream f("/proc/self/status");
  std::string line, key = std::string(field) + ":";
  while (std::getline(f, line)) {
    if (line.compare(0, key.size(), key) == 0) return std::atoll(line.c_str() + key.size()) * 1024;
  }
  return -1;
}

// resident bytes of the mappings of `file` (the program: its portable-kernel constants, such
// as the token and PLE tables, are read from the map and only touched rows become resident)
long long mapped_rss_bytes(const std::string& file) {
  char real[PATH_MAX];
  if (!realpath(file.c_str(), real)) return -1;
  std::ifstream f("/proc/self/smaps");
  if (!f) return -1;
  std::string line;
  bool inside = false;
  long long total = 0;
  while (std::getline(f, line)) {
    std::istringstream words(line);
    std::string first;
    words >> first;
    if (!first.empty() && first.back() != ':') {  // a mapping header: range perms offset dev inode [path]
      std::string perms, offset, dev, inode, path;
      words >> perms >> offset >> dev >> inode >> path;
      inside = path == real;
    } else if (inside && first == "Rss:") {
      long long kb = 0;
      words >> kb;
      total += kb * 1024;
    }
  }
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  std::string pte;
  std::vector<int64_t> prompt;
  long long max_new = 64, draft = 0, chunk = 0;
  bool ignore_eos = false, share = true, memory = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) { usage((std::string(name) + " needs a value").c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--pte") {
      pte = value("--pte");
    } else if (a == "--prompt-ids") {
      std::string s = value("--prompt-ids");
      size_t p = 0;
      while (p < s.size()) {
        size_t q = s.find(',', p);
        std::string part = s.substr(p, q == std::string::npos ? std::string::npos : q - p);
        long long v;
        if (!parse_int(part.c_str(), v)) return usage(("--prompt-ids: not an integer: '" + part + "'").c_str());
        prompt.push_back(v);
        if (q == std::string::npos) break;
        p = q + 1;
      }
    } else if (a == "--max-new-tokens") {
      if (!parse_int(value(a.c_str()), max_new) || max_new < 1) return usage("--max-new-tokens must be a positive integer");
    } else if (a == "--draft-tokens") {
      if (!parse_int(value(a.c_str()), draft) || draft < 0) return usage("--draft-tokens must be an integer >= 0");
    } else if (a == "--prefill-chunk") {
      if (!parse_int(value(a.c_str()), chunk) || chunk < 1) return usage("--prefill-chunk must be a positive integer");
    } else if (a == "--ignore-eos") {
      ignore_eos = true;
    } else if (a == "--memory") {
      memory = true;
    } else if (a == "--no-shared-arenas") {
      share = false;  // how ExecuTorch's Android and iOS bindings create a Module (for the refusal test)
    } else {
      return usage(("unknown argument " + a).c_str());
    }
  }
  if (pte.empty()) return usage("--pte is required");
  if (prompt.empty()) return usage("--prompt-ids is required");

  char err[1024] = {0};
  gemma4_spec_runner* r = gemma4_spec_open(pte.c_str(), share ? 1 : 0, static_cast<int>(chunk), err, sizeof err);
  if (!r) {
    std::fprintf(stderr, "error: %s\n", err);
    return 2;
  }
  gemma4_spec_stats st{};
  int rc = gemma4_spec_generate(r, prompt.data(), prompt.size(), static_cast<int>(max_new), static_cast<int>(draft),
                                ignore_eos ? 1 : 0, print_token, nullptr, &st, err, sizeof err);
  std::string mem;
  if (memory) {  // measured with the program still loaded
    std::ostringstream m;
    m << ", \"peak_rss_bytes\": " << status_bytes("VmHWM") << ", \"rss_bytes\": " << status_bytes("VmRSS")
      << ", \"rss_anon_bytes\": " << status_bytes("RssAnon") << ", \"locked_bytes\": " << status_bytes("VmLck")
      << ", \"program_mapped_rss_bytes\": " << mapped_rss_bytes(pte);
    mem = m.str();
  }
  gemma4_spec_close(r);
  if (rc != 0) {
    std::fprintf(stderr, "error: %s\n", err);
    return rc == 2 ? 2 : 1;
  }
  const int verify = st.target_passes > 1 ? st.target_passes - 1 : 0;
  const double mal = verify ? static_cast<double>(st.new_tokens - 1) / verify : st.new_tokens;
  std::printf(
      "{\"new_tokens\": %d, \"target_passes\": %d, \"drafted\": %d, \"accepted\": %d, \"seconds\": %.4f, "
      "\"verify_passes\": %d, \"mean_accepted_length\": %.4f, \"acceptance_rate\": %.4f, \"tokens_per_second\": %.2f%s}\n",
      st.new_tokens, st.target_passes, st.drafted, st.accepted, st.seconds, verify, mal,
      st.drafted ? static_cast<double>(st.accepted) / st.drafted : 0.0, st.seconds > 0 ? st.new_tokens / st.seconds : 0.0,
      mem.c_str());
  return 0;
}
