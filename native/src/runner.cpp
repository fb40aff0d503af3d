// The speculative loop of runtime/loop.py over ExecuTorch's Module API, for apps.
//
// Program contract (export/executorch_export.py): target_step(tokens [1, N], input_pos [1],
// logit_index [R]) -> logits [1, R, V], hidden [1, R, H] (the call's last R positions); draft_k{k}(token [1, 1],
// state [1, 1, H], input_pos [1]) -> drafts [1, k]; reset_caches(); shared_kv() -> the
// producer caches (full key first, [1, kv_heads, max_context, head_dim]); constant methods
// get_vocab_size, get_max_context_len, get_eos_ids.
//
// Speculative round (greedy acceptance), tok = next token at position pos, h = hidden at
// pos - 1: drafts d_1..d_k = draft_k(tok, h, pos); verify target([tok, d_1..d_k], pos) ->
// choices c_0..c_k; accept the longest prefix with d_i == c_{i-1} (a drafts) plus c_a;
// next tok = c_a at pos + a + 1, h = hidden[a]. Output identical to greedy decoding.

#include "gemma4_spec.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using executorch::extension::Module;
using executorch::extension::make_tensor_ptr;
using executorch::runtime::EValue;

namespace {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct InputError : Error {  // bad arguments: gemma4_spec_generate returns 2
  using Error::Error;
};

std::vector<EValue> run(Module& m, const std::string& method, const std::vector<EValue>& inputs) {
  auto out = m.execute(method, inputs);
  if (!out.ok()) {
    throw Error("method " + method + " failed (ExecuTorch error " + std::to_string(static_cast<int>(out.error())) + ")");
  }
  return out.get();
}

int64_t argmax(const float* row, int64_t n) {
  return std::max_element(row, row + n) - row;
}

}  // namespace

struct gemma4_spec_runner {
  std::unique_ptr<Module> module;
  int64_t vocab = 0, max_context = 0, hidden = 0;
  int max_draft = 0;  // the longest draft_k{k} method
  bool has_draft_step = false;
  int prefill_chunk = 256;
  std::vector<int64_t> eos;
  bool shared_checked = false;

  gemma4_spec_runner(const char* path, bool share, int chunk) {
    module = std::make_unique<Module>(path, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, share);
    if (module->load() != executorch::runtime::Error::Ok) {
      throw Error(std::string(path) + ": cannot load the program (not an ExecuTorch .pte, or built by another version)");
    }
    auto names = module->method_names();
    if (!names.ok()) throw Error(std::string(path) + ": cannot list methods");
    for (const char* need : {"target_step", "reset_caches", "get_vocab_size", "get_max_context_len", "get_eos_ids"}) {
      if (!names.get().count(need)) {
        throw Error(std::string(path) + " has no method " + need + ": not a program of this toolchain; re-export it");
      }
    }
    for (const auto& n : names.get()) {
      if (n.rfind("draft_k", 0) == 0) max_draft = std::max(max_draft, std::stoi(n.substr(7)));
    }
    has_draft_step = names.get().count("draft_step") > 0;
    if (has_draft_step && max_draft == 0) {
      // rounds of single steps: as long as the sliding caches allow (ring slots = window +
      // max_draft + 1; the logit rows of target_step are bounded by max_draft + 1 too)
      auto meta = module->method_meta("target_step");
      if (meta.ok()) {
        auto idx = meta->input_tensor_meta(2);
        if (idx.ok()) max_draft = static_cast<int>(idx->sizes()[0]) - 1;
      }
    }
    vocab = run(*module, "get_vocab_size", {})[0].toInt();
    max_context = run(*module, "get_max_context_len", {})[0].toInt();
    for (const auto& e : run(*module, "get_eos_ids", {})) eos.push_back(e.toInt());
    auto meta = module->method_meta("target_step");
    if (!meta.ok() || meta->num_inputs() != 3) {
      throw Error(std::string(path) + ": target_step does not take (tokens, input_pos, logit_index); re-export it");
    }
    auto hid = meta->output_tensor_meta(1);
    if (!hid.ok()) throw Error(std::string(path) + ": target_step has no hidden-state output");
    auto sizes = hid->sizes();
    hidden = sizes[sizes.size() - 1];
    // tokens per target call: at most the program's bound (get_max_seq_len), and the context
    int64_t max_chunk = max_context;
    if (names.get().count("get_max_seq_len")) max_chunk = std::min(max_chunk, run(*module, "get_max_seq_len", {})[0].toInt());
    prefill_chunk = static_cast<int>(chunk > 0 ? std::min<int64_t>(chunk, max_chunk) : std::min<int64_t>(256, max_chunk));
  }

  void reset() {
    run(*module, "reset_caches", {});
    shared_checked = false;
  }

  // target over ids at start..start+N-1: logits of the last min(N, max_draft + 1) positions
  // (rows x vocab), hidden of the last position; all_hidden: hidden of the same rows.
  void target(const std::vector<int64_t>& ids, int64_t start, std::vector<float>& logits, int64_t& rows,
              std::vector<float>& last_hidden, std::vector<float>* all_hidden = nullptr) {
    const int64_t n = static_cast<int64_t>(ids.size());
    if (start + n > max_context) {
      throw InputError("context of " + std::to_string(start + n) + " tokens exceeds the program's max_context " +
                  std::to_string(max_context));
    }
    const int64_t want = std::min<int64_t>(n, max_draft + 1);
    // chunk starts; the last chunk holds at least `want` tokens (runtime/loop.py prefill_chunks)
    std::vector<int64_t> starts;
    for (int64_t s = 0; s < n; s += prefill_chunk) starts.push_back(s);
    if (n - starts.back() < want) {
      std::vector<int64_t> kept;
      for (int64_t s : starts) if (s < n - want) kept.push_back(s);
      kept.push_back(n - want);
      starts = kept;
    }
    for (size_t c = 0; c < starts.size(); ++c) {
      const int64_t a = starts[c], b = c + 1 < starts.size() ? starts[c + 1] : n, len = b - a;
      const bool last = b == n;
      const int64_t r = last ? want : 1;
      std::vector<int64_t> index(static_cast<size_t>(r));
      for (int64_t i = 0; i < r; ++i) index[i] = len - r + i;
      auto tok = make_tensor_ptr({1, static_cast<int>(len)}, std::vector<int64_t>(ids.begin() + a, ids.begin() + b));
      auto pos = make_tensor_ptr({1}, std::vector<int64_t>{start + a});
      auto idx = make_tensor_ptr({static_cast<int>(r)}, std::move(index));
      auto out = run(*module, "target_step", {EValue(*tok), EValue(*pos), EValue(*idx)});
      if (last) {
        // hidden [1, r, H]: the same rows as the logits (a program before format 3 returned
        // all len rows: its last r are the same positions)
        const auto& h = out[1].toTensor();
        const float* hp = h.const_data_ptr<float>() + (h.size(1) - r) * hidden;
        if (all_hidden) all_hidden->assign(hp, hp + r * hidden);
        const auto& lg = out[0].toTensor();
        logits.assign(lg.const_data_ptr<float>(), lg.const_data_ptr<float>() + r * vocab);
        rows = r;
        last_hidden.assign(hp + (r - 1) * hidden, hp + r * hidden);
      }
    }
  }

  // The drafter methods read the target's caches only when the methods share their memory
  // arenas; loaded without (as ExecuTorch's Android and iOS bindings load a Module), they
  // read empty caches and every draft is wasted, silently. At the first round after a reset
  // (position n), the full producer cache as shared_kv sees it must hold position n - 1 and
  // an empty last slot (unless the context is full): an unshared arena fails one or the
  // other, zeroed or not (runtime/executorch_backend.py checks the same).
  void check_shared_caches(int64_t n) {
    if (shared_checked) return;
    auto names = module->method_names();
    if (!names.get().count("shared_kv")) throw Error("the program has no shared_kv method to check cache sharing; re-export it");
    auto out = run(*module, "shared_kv", {});
    const auto& key = out[0].toTensor();  // [1, kv_heads, max_context, head_dim]
    const int64_t heads = key.size(1), slots = key.size(2), dim = key.size(3);
    const float* k = key.const_data_ptr<float>();
    bool written = false, clean = true;
    for (int64_t hd = 0; hd < heads; ++hd) {
      const float* row = k + (hd * slots + (n - 1)) * dim;
      for (int64_t i = 0; i < dim; ++i) written |= row[i] != 0.f;
      if (n < slots) {
        const float* last = k + (hd * slots + slots - 1) * dim;
        for (int64_t i = 0; i < dim; ++i) clean &= last[i] == 0.f;
      }
    }
    if (!written || !clean) {
      throw Error(
          "speculative decoding refused: the drafter methods do not see the caches the target method wrote "
          "(the program was loaded without shared memory arenas). Every draft would be rejected and decoding "
          "would run slower than greedy. Create the ExecuTorch Module with share_memory_arenas = true "
          "(gemma4_spec_open(..., share_memory_arenas = 1, ...)), or decode greedily (draft_tokens = 0).");
    }
    shared_checked = true;
  }

  // k single draft_step calls with an argmax after each (a program without round methods)
  std::vector<int64_t> chained_drafts(int64_t token, std::vector<float> state, int64_t pos, int k) {
    if (!has_draft_step) throw Error("the program has no draft_step or draft_k methods: export it with a drafter");
    std::vector<int64_t> out;
    for (int i = 0; i < k; ++i) {
      auto tok = make_tensor_ptr({1, 1}, std::vector<int64_t>{token});
      auto st = make_tensor_ptr({1, 1, static_cast<int>(hidden)}, std::vector<float>(state));
      auto p = make_tensor_ptr({1}, std::vector<int64_t>{pos});
      auto res = run(*module, "draft_step", {EValue(*tok), EValue(*st), EValue(*p)});
      token = argmax(res[0].toTensor().const_data_ptr<float>(), vocab);
      const float* next = res[1].toTensor().const_data_ptr<float>();
      state.assign(next, next + hidden);
      out.push_back(token);
    }
    return out;
  }

  std::vector<int64_t> drafts(int64_t token, const std::vector<float>& state, int64_t pos, int k) {
    int m = k;
    auto names = module->method_names();
    while (m <= max_draft && !names.get().count("draft_k" + std::to_string(m))) ++m;
    if (m > max_draft) return chained_drafts(token, state, pos, k);
    auto tok = make_tensor_ptr({1, 1}, std::vector<int64_t>{token});
    auto st = make_tensor_ptr({1, 1, static_cast<int>(hidden)}, std::vector<float>(state));
    auto p = make_tensor_ptr({1}, std::vector<int64_t>{pos});
    auto out = run(*module, "draft_k" + std::to_string(m), {EValue(*tok), EValue(*st), EValue(*p)});
    const int64_t* d = out[0].toTensor().const_data_ptr<int64_t>();
    return std::vector<int64_t>(d, d + k);  // a longer round's first k drafts are the k-round's
  }

  bool is_eos(int64_t t) const { return std::find(eos.begin(), eos.end(), t) != eos.end(); }

  void generate(const std::vector<int64_t>& prompt, int max_new, int k, bool ignore_eos, gemma4_spec_on_token cb,
                void* user, gemma4_spec_stats& st) {
    if (prompt.empty()) throw InputError("the prompt is empty");
    for (int64_t t : prompt) {
      if (t < 0 || t >= vocab) {
        throw InputError("prompt token id " + std::to_string(t) + " outside the vocabulary 0.." + std::to_string(vocab - 1));
      }
    }
    if (max_new < 1) throw InputError("max_new_tokens must be >= 1");
    if (k < 0) throw InputError("draft_tokens must be >= 0");
    if (k > max_draft) {
      throw InputError("draft_tokens " + std::to_string(k) + " exceeds the program's longest drafting round (max_draft " +
                  std::to_string(max_draft) + ")");
    }
    if (static_cast<int64_t>(prompt.size()) + max_new - 1 > max_context) {  // the last token is not fed back
      throw InputError("prompt + max_new_tokens - 1 = " + std::to_string(prompt.size() + max_new - 1) +
                  " exceeds the program's max_context " + std::to_string(max_context));
    }
    st = gemma4_spec_stats{};
    const auto t0 = std::chrono::steady_clock::now();
    reset();
    std::vector<float> logits, h, hidden_all;
    int64_t rows = 0;
    target(prompt, 0, logits, rows, h);
    st.target_passes = 1;
    int64_t pos = static_cast<int64_t>(prompt.size());
    int64_t tok = argmax(logits.data() + (rows - 1) * vocab, vocab);
    bool done = false;
    auto emit = [&](int64_t t) {
      ++st.new_tokens;
      if (cb && cb(t, user)) done = true;
      if ((!ignore_eos && is_eos(t)) || st.new_tokens >= max_new) done = true;
    };
    emit(tok);
    while (!done) {
      const int kk = std::min(k, max_new - st.new_tokens - 1);
      std::vector<int64_t> d;
      if (kk > 0) {
        check_shared_caches(pos);
        d = drafts(tok, h, pos, kk);
      }
      std::vector<int64_t> ids{tok};
      ids.insert(ids.end(), d.begin(), d.end());
      target(ids, pos, logits, rows, h, &hidden_all);
      ++st.target_passes;
      int a = 0;
      while (a < kk && d[a] == argmax(logits.data() + a * vocab, vocab)) ++a;
      st.drafted += kk;
      st.accepted += a;
      for (int i = 0; i < a && !done; ++i) emit(d[i]);
      const int64_t next = argmax(logits.data() + a * vocab, vocab);
      if (!done) emit(next);
      h.assign(hidden_all.begin() + a * hidden, hidden_all.begin() + (a + 1) * hidden);
      tok = next;
      pos += a + 1;
    }
    st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

namespace {
void put(char* err, size_t len, const std::string& msg) {
  if (err && len) {
    std::strncpy(err, msg.c_str(), len - 1);
    err[len - 1] = '\0';
  }
}
}  // namespace

extern "C" {

gemma4_spec_runner* gemma4_spec_open(const char* pte_path, int share_memory_arenas, int prefill_chunk, char* err,
                                     size_t err_len) {
  try {
    return new gemma4_spec_runner(pte_path, share_memory_arenas != 0, prefill_chunk);
  } catch (const std::exception& e) {
    put(err, err_len, e.what());
    return nullptr;
  }
}

int gemma4_spec_generate(gemma4_spec_runner* runner, const int64_t* prompt, size_t prompt_len, int max_new_tokens,
                         int draft_tokens, int ignore_eos, gemma4_spec_on_token on_token, void* user,
                         gemma4_spec_stats* stats, char* err, size_t err_len) {
  try {
    gemma4_spec_stats st{};
    runner->generate(std::vector<int64_t>(prompt, prompt + prompt_len), max_new_tokens, draft_tokens, ignore_eos != 0,
                     on_token, user, st);
    if (stats) *stats = st;
    return 0;
  } catch (const InputError& e) {
    put(err, err_len, e.what());
    return 2;
  } catch (const std::exception& e) {
    put(err, err_len, e.what());
    return 1;
  }
}

int gemma4_spec_max_draft(const gemma4_spec_runner* runner) { return runner->max_draft; }

int64_t gemma4_spec_vocab_size(const gemma4_spec_runner* runner) { return runner->vocab; }

void gemma4_spec_close(gemma4_spec_runner* runner) { delete runner; }

}  // extern "C"
