// Next-token logits of a GGUF model in llama.cpp, for comparing llama.cpp with transformers (make check-clients).
//
//   transact-llama-logits MODEL.gguf TEXT_FILE OUT.bin [default|fp32]
//
// The text is tokenized by llama.cpp itself (no BOS/EOS added, special tokens not parsed, as the transformers side
// does with add_special_tokens=False) and run as one batch with every position's logits kept. The mode sets how the
// attention computes: `default` is what llama.cpp users get (f16 KV cache, flash attention where the backend has it,
// which on the CPU also rounds to f16 inside); `fp32` keeps it in fp32 (f32 KV cache, no flash attention), the same
// computation as transformers in fp32. OUT.bin: int32 n_tokens, int32 n_vocab, int32 token ids[n_tokens],
// float32 logits[n_tokens][n_vocab], little-endian. Built by benchmarks/llama_cpp_build.sh against its libllama.
#include "llama.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int fail(const char * message) {
    fprintf(stderr, "error: %s\n", message);
    return 1;
}

int main(int argc, char ** argv) {
    if (argc < 4 || argc > 5) {
        return fail("usage: transact-llama-logits MODEL.gguf TEXT_FILE OUT.bin [default|fp32]");
    }
    const std::string mode = argc == 5 ? argv[4] : "default";
    if (mode != "default" && mode != "fp32") {
        return fail("the mode must be default or fp32");
    }
    std::ifstream text_file(argv[2], std::ios::binary);
    if (!text_file) {
        return fail("cannot read TEXT_FILE");
    }
    const std::string text((std::istreambuf_iterator<char>(text_file)), std::istreambuf_iterator<char>());

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.progress_callback = [](float, void *) { return true; };  // no progress dots on stderr
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (model == nullptr) {
        return fail("llama.cpp could not load the model");
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_needed = -llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), nullptr, 0, false, false);
    std::vector<llama_token> tokens(n_needed);
    if (n_needed <= 0 || llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), tokens.data(), n_needed, false, false) != n_needed) {
        return fail("tokenization failed");
    }
    const int n_tokens = n_needed;
    const int n_vocab = llama_vocab_n_tokens(vocab);

    llama_context_params params = llama_context_default_params();
    params.n_ctx = params.n_batch = params.n_ubatch = (uint32_t) n_tokens;
    params.n_threads = params.n_threads_batch = 2;
    if (mode == "fp32") {
        params.type_k = params.type_v = GGML_TYPE_F32;
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    params.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, params);
    if (ctx == nullptr) {
        return fail("llama.cpp could not create a context");
    }
    llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int i = 0; i < n_tokens; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_tokens;
    if (llama_decode(ctx, batch) != 0) {
        return fail("llama_decode failed");
    }

    FILE * out = fopen(argv[3], "wb");
    if (out == nullptr) {
        return fail("cannot write OUT.bin");
    }
    fwrite(&n_tokens, sizeof(int32_t), 1, out);
    fwrite(&n_vocab, sizeof(int32_t), 1, out);
    fwrite(tokens.data(), sizeof(llama_token), n_tokens, out);
    for (int i = 0; i < n_tokens; ++i) {
        fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
    }
    const bool written = fclose(out) == 0;

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return written ? 0 : fail("writing OUT.bin failed");
}
