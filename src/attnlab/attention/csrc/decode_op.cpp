// attnlab::decode_attention and attnlab::decode_linear: decode.c's kernels as PyTorch operators
// (CPU), so that compiled decoding steps call them through the dispatcher like any ATen operator.
// Checks the arguments and makes them contiguous; the kernels themselves are in decode.c. Their
// shape functions for tracing are registered from Python (_native.py), where symbolic sizes pass
// through without specialising.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

extern "C" int decode_attention(const float *q, const float *k, const float *v, float *out, const int64_t *position,
                                int64_t B, int64_t H_kv, int64_t G, int64_t S, int64_t D, int64_t Dv, int64_t v_row,
                                float scale);

extern "C" void decode_linear(const float *x, int64_t x_row_stride, const float *w, const float *add,
                              int64_t add_row_stride, float *out, int64_t M, int64_t N, int64_t K);

namespace {

// x (M, K) @ weight (N, K)^T + add, add (N) or (M, N) or none.
at::Tensor decode_linear_cpu(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &add) {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "decode_linear: x (M, K) and ",
                "weight (N, K) do not match: ", x.sizes(), ", ", weight.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "decode_linear: float32 only");
    const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
    const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous(), wc = weight.contiguous();
    at::Tensor addc;
    int64_t add_row_stride = 0;
    if (add.has_value()) {
        TORCH_CHECK(add->scalar_type() == at::kFloat && add->size(-1) == N && add->numel() % N == 0
                        && (add->numel() == N || add->numel() == M * N), "decode_linear: add must be (N) or (M, N), got ",
                    add->sizes());
        addc = add->contiguous();
        add_row_stride = addc.numel() == N ? 0 : N;
    }
    at::Tensor out = at::empty({M, N}, x.options());
    decode_linear(xc.data_ptr<float>(), xc.stride(0), wc.data_ptr<float>(),
                  add.has_value() ? addc.data_ptr<float>() : nullptr, add_row_stride, out.data_ptr<float>(), M, N, K);
    return out;
}

at::Tensor decode_attention_cpu(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                const at::Tensor &position, double scale) {
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, H, 1, D), got ", q.sizes());
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == q.size(0) && v.sizes().slice(0, 3) == k.sizes().slice(0, 3)
                    && k.size(3) == q.size(3), "decode_attention: k (B, H_kv, S, D) and v (B, H_kv, S, D_v) ",
                "do not match q ", q.sizes(), ": ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode_attention: ", q.size(1), " query heads over ", k.size(1), " KV heads");
    TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                "decode_attention: float32 only");
    TORCH_CHECK(position.numel() == 1 && position.scalar_type() == at::kLong, "decode_attention: position must be "
                "one int64");
    // v may be a view of wider rows (MLA: its latents, the first channels of the cached rows): read in place
    const int64_t S = k.size(2), row = v.stride(2);
    const bool rows_in_place = v.stride(3) == 1 && row >= v.size(3) && (v.size(1) == 1 || v.stride(1) == S * row)
                               && (v.size(0) == 1 || v.stride(0) == k.size(1) * S * row);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = rows_in_place ? v : v.contiguous();
    at::Tensor out = at::empty({q.size(0), q.size(1), 1, v.size(3)}, q.options());
    const int status = decode_attention(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                                        out.data_ptr<float>(), position.data_ptr<int64_t>(), q.size(0), k.size(1),
                                        q.size(1) / k.size(1), S, q.size(3), v.size(3),
                                        rows_in_place ? row : v.size(3), static_cast<float>(scale));
    TORCH_CHECK(status == 0, "decode_attention: ", q.size(1) / k.size(1), " query heads per KV head (at most 16) or ",
                "value width ", v.size(3), " (at most 256), or out of memory");
    return out;
}

}  // namespace

// The same operators as AOTInductor C shims: a compiled step whose C++ wrapper is told of them
// (torch._inductor.config.aot_inductor.custom_ops_to_c_shims, see _native.decode_c_shims) calls
// these directly instead of through the boxed dispatcher (IValue stacks and casts at every call).
// Their names and argument conventions are inductor's: aoti_torch_<device>_<op>, Tensor? as a
// pointer to a handle (nullptr for None), float as double, the result through *ret0.
extern "C" AOTITorchError aoti_torch_cpu_decode_linear(AtenTensorHandle x, AtenTensorHandle weight,
                                                       AtenTensorHandle *add, AtenTensorHandle *ret0) {
    using namespace torch::aot_inductor;
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
        *ret0 = new_tensor_handle(decode_linear_cpu(*tensor_handle_to_tensor_pointer(x),
                                                    *tensor_handle_to_tensor_pointer(weight),
                                                    pointer_to_optional<at::Tensor>(add)));
    });
}

extern "C" AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                                          AtenTensorHandle position, double scale,
                                                          AtenTensorHandle *ret0) {
    using namespace torch::aot_inductor;
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
        *ret0 = new_tensor_handle(decode_attention_cpu(
            *tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(k),
            *tensor_handle_to_tensor_pointer(v), *tensor_handle_to_tensor_pointer(position), scale));
    });
}

TORCH_LIBRARY_FRAGMENT(attnlab, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor position, float scale) -> Tensor");
    m.def("decode_linear(Tensor x, Tensor weight, Tensor? add) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnlab, CPU, m) {
    m.impl("decode_attention", decode_attention_cpu);
    m.impl("decode_linear", decode_linear_cpu);
}
