// libtorch's fused AdamW kernel (`at::_fused_adamw_`, one pass over parameters, gradients and
// both moments on CPU and CUDA), which tch does not expose. The tensors arrive as tch passes
// them: pointers to `at::Tensor`.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {
std::vector<at::Tensor> gather(at::Tensor **ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}
}  // namespace

extern "C" {

// Returns NULL on success, else a malloc'ed message the caller frees.
char *pivot_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                        at::Tensor **exp_avg_sqs, at::Tensor **steps, int n, double lr,
                        double beta1, double beta2, double weight_decay, double eps,
                        at::Tensor *grad_scale) {
  try {
    auto p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n),
         v = gather(exp_avg_sqs, n), s = gather(steps, n);
    std::optional<at::Tensor> scale;
    if (grad_scale != nullptr) scale = *grad_scale;
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, scale, /*found_inf=*/std::nullopt);
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in at::_fused_adamw_");
  }
}

}  // extern "C"
