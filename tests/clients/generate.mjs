// Greedy generation with transformers.js (@huggingface/transformers) in Node, from a
// transformers.js model folder (`make export TARGET=web` writes one): prints one JSON line
// {"tokens": [...new token ids...], "dtype": ...}. Used by tests/test_clients.py.
//
//   node generate.mjs <model_dir> <comma-separated prompt ids> <max_new_tokens>
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { AutoModelForCausalLM, Tensor, env } from '@huggingface/transformers';

const [dir, idsArg, maxArg] = process.argv.slice(2);
if (!dir || !idsArg || !maxArg) {
    console.error('usage: node generate.mjs <model_dir> <prompt ids, comma-separated> <max_new_tokens>');
    process.exit(2);
}
const ids = idsArg.split(',').map((x) => BigInt(x));
const maxNew = Number(maxArg);
const config = JSON.parse(readFileSync(path.join(dir, 'config.json'), 'utf8'));
const dtype = config['transformers.js_config']?.dtype ?? 'fp32';

env.allowRemoteModels = false; // local folder only: nothing is fetched
env.localModelPath = path.dirname(path.resolve(dir));
const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(dir)), {
    dtype,
    device: 'cpu',
    local_files_only: true,
});
const input_ids = new Tensor('int64', BigInt64Array.from(ids), [1, ids.length]);
const attention_mask = new Tensor('int64', BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
// exactly maxNew tokens: EOS does not stop the run (the Python runtime's --ignore-eos)
const out = await model.generate({
    input_ids,
    attention_mask,
    max_new_tokens: maxNew,
    do_sample: false,
    eos_token_id: [],
});
const all = Array.from(out.data, (x) => Number(x));
console.log(JSON.stringify({ tokens: all.slice(ids.length), dtype }));
