/* gemma4_spec: greedy and speculative (MTP drafter) decoding over an exported pair.pte.
 *
 * A C interface an Android JNI or Swift wrapper can call. Everything the runner needs is read
 * from the program itself (its constant methods and method signatures): vocabulary, context
 * length, EOS ids, hidden size, the longest drafting round. Token ids in, token ids out
 * (tokenization stays in the app). Not thread-safe: one runner per thread.
 */
#ifndef GEMMA4_SPEC_H
#define GEMMA4_SPEC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gemma4_spec_runner gemma4_spec_runner;

typedef struct {
  int32_t new_tokens;
  int32_t target_passes; /* prefill counts as one */
  int32_t drafted;
  int32_t accepted;
  double seconds;
} gemma4_spec_stats;

/* Called for each new token as it is decided; return nonzero to stop early. */
typedef int (*gemma4_spec_on_token)(int64_t token, void* user);

/* Opens pair.pte. share_memory_arenas must be 1 for speculative decoding: the drafter methods
 * read the caches the target method writes only when the methods share their arenas.
 * prefill_chunk: tokens per target call during prefill (0: 256). Returns NULL and writes a
 * message into err on failure. */
gemma4_spec_runner* gemma4_spec_open(const char* pte_path, int share_memory_arenas, int prefill_chunk, char* err,
                                     size_t err_len);

/* Greedy (draft_tokens = 0) or speculative decoding with draft_tokens drafts per round, the
 * output identical to greedy decoding. Stops at an EOS id of the program unless ignore_eos.
 * Returns 0 on success; 2 for bad input (ids outside the vocabulary, too many drafts, past
 * max_context) and 1 for a refused or failed run (speculative decoding over caches the
 * drafter cannot see), with a message in err. */
int gemma4_spec_generate(gemma4_spec_runner* runner, const int64_t* prompt, size_t prompt_len, int max_new_tokens,
                         int draft_tokens, int ignore_eos, gemma4_spec_on_token on_token, void* user,
                         gemma4_spec_stats* stats, char* err, size_t err_len);

/* Facts read from the program. */
int gemma4_spec_max_draft(const gemma4_spec_runner* runner);
int64_t gemma4_spec_vocab_size(const gemma4_spec_runner* runner);

void gemma4_spec_close(gemma4_spec_runner* runner);

#ifdef __cplusplus
}
#endif

#endif /* GEMMA4_SPEC_H */
