// Activation checkpointing (recompute in backward) for the prelude's layers: a torch autograd
// Function whose forward runs a Rust closure without recording a graph and keeps only its input,
// and whose backward runs the closure again with grad on and back-propagates through it (the
// reentrant scheme of torch.utils.checkpoint). tch has no custom autograd functions, hence C++.
// The closure is owned here from the first call on: a capsule in the node's saved data frees it
// (through the Rust `drop` callback) when the node goes, or at once when no node is made.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

extern "C" {
// Runs the closure on `input` (owned by the callee) and returns a new `at::Tensor*` the caller
// owns, or NULL when the closure failed (panicked).
typedef at::Tensor *(*pivot_recompute_call)(void *closure, at::Tensor *input);
typedef void (*pivot_recompute_drop)(void *closure);
}

namespace {

struct Closure : torch::CustomClassHolder {
  void *closure;
  pivot_recompute_call call;
  pivot_recompute_drop drop;
  Closure(void *c, pivot_recompute_call f, pivot_recompute_drop d) : closure(c), call(f), drop(d) {}
  ~Closure() override { drop(closure); }
  at::Tensor run(const at::Tensor &x) const {
    at::Tensor *out = call(closure, new at::Tensor(x));
    if (out == nullptr) throw std::runtime_error("the recomputed layer failed (see the panic message above)");
    at::Tensor y = *out;
    delete out;
    return y;
  }
};

struct Recompute : torch::autograd::Function<Recompute> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, c10::IValue fn, const at::Tensor &x) {
    ctx->saved_data["fn"] = fn;
    ctx->save_for_backward({x});
    return static_cast<Closure *>(fn.toCapsule().get())->run(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx, torch::autograd::variable_list grad) {
    auto fn = ctx->saved_data["fn"].toCapsule();
    at::Tensor saved = ctx->get_saved_variables()[0];
    at::Tensor x = saved.detach().requires_grad_(saved.requires_grad());
    at::Tensor y;
    {
      at::AutoGradMode on(true);
      y = static_cast<Closure *>(fn.get())->run(x);
    }
    // Gradients of the layer's weights accumulate into their .grad here; the input's is returned.
    if (y.requires_grad()) torch::autograd::backward({y}, {grad[0]});
    return {at::Tensor(), x.requires_grad() ? x.grad() : at::Tensor()};
  }
};

}  // namespace

extern "C" {

// `*out` = the closure applied to `*x`, recomputed in backward instead of keeping its
// activations. Takes ownership of the closure in every case. NULL or a malloc'ed error message.
char *pivot_recompute(at::Tensor *x, void *closure, pivot_recompute_call call, pivot_recompute_drop drop, at::Tensor **out) {
  try {
    auto fn = c10::IValue::make_capsule(c10::make_intrusive<Closure>(closure, call, drop));
    at::Tensor y = Recompute::apply(fn, *x);
    *out = new at::Tensor(std::move(y));
    return nullptr;
  } catch (const std::exception &e) {
    return strdup((std::string("activation recompute: ") + e.what()).c_str());
  } catch (...) {
    return strdup("activation recompute: unknown C++ exception");
  }
}

}  // extern "C"
