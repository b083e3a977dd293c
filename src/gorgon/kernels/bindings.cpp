// Python bindings of Gorgon's CPU kernels (one extension module).
#include <torch/extension.h>

torch::Tensor pack_weight(torch::Tensor w);
torch::Tensor invariant_linear(torch::Tensor x, torch::Tensor packed, int64_t N, c10::optional<torch::Tensor> b);
std::vector<torch::Tensor> invariant_linear_joint(torch::Tensor x, torch::Tensor packed, int64_t N, int64_t m_full,
                                                  int64_t n_prefix, torch::Tensor col_of);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor row_seq,
                              torch::Tensor row_pos, torch::Tensor slot_table, torch::Tensor row_group, int64_t window,
                              double scale);

torch::Tensor add_rms_norm(c10::optional<torch::Tensor> x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                         torch::Tensor v_cache, torch::Tensor slots, int64_t nh, int64_t nkv, int64_t d);
torch::Tensor silu_mul(torch::Tensor gate_up);
std::vector<torch::Tensor> greedy_pick(torch::Tensor logits);
std::vector<torch::Tensor> top_k_rows(torch::Tensor x, int64_t k);
void lora_apply(torch::Tensor x, torch::Tensor y, torch::Tensor row_adapter, std::vector<torch::Tensor> a,
                std::vector<torch::Tensor> b_t, std::vector<double> scales, int64_t col_offset);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "pack a [N, K] weight into the linear kernel's tile layout");
  m.def("invariant_linear", &invariant_linear, "batch-invariant linear on a packed weight (AVX-512)");
  m.def("invariant_linear_joint", &invariant_linear_joint,
        "rows [0, m_full) on every column of a permuted packed weight, the rest on its first n_prefix columns");
  m.def("add_rms_norm", &add_rms_norm, "residual += x; RMSNorm(residual) * weight (per row)");
  m.def("rope_store", &rope_store, "rotary q/k from a fused qkv row, k/v written to the cache");
  m.def("paged_attention", &paged_attention, "batch-invariant paged attention, float32 (AVX-512)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from a fused [T, 2I] gate/up projection (per row)");
  m.def("greedy_pick", &greedy_pick, "per row: index of the first maximum and its log-softmax value");
  m.def("top_k_rows", &top_k_rows, "per row: the k largest values, descending, and their indices");
  m.def("lora_apply", &lora_apply, "batch-invariant multi-LoRA shrink+expand, in place (AVX-512)");
}
