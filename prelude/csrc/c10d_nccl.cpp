// c10d's ProcessGroupNCCL over the same TCPStore rendezvous as csrc/c10d_gloo.cpp, with the same
// collectives. Built as a shared library (build.rs) that the prelude embeds and dlopens only when
// a run asks for NCCL, after libtorch_cuda.so is loaded: every symbol used here is exported by
// libtorch_cuda.so (ProcessGroupNCCL, linked to the wheel's libnccl.so.2) or libtorch_cpu.so, so
// binaries that never use NCCL do not load the CUDA libraries at start.
//
// NCCL reduces only CUDA tensors; the trainers also all-reduce a few small CPU tensors (stop
// flags, metrics, gradient-norm squares), which are staged through the rank's GPU here.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <c10/cuda/CUDAFunctions.h>

#include "guarded.hpp"

#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using pivot_c10d::guarded;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
  at::Device device;
};

Group *as_group(void *g) { return static_cast<Group *>(g); }

// Runs `op` on `t` as a CUDA tensor on the group's device: `t` itself when it is one, else a copy
// that is written back once the collective has finished.
template <typename F>
void on_device(Group *g, at::Tensor &t, F op) {
  if (t.is_cuda()) {
    op(t);
    return;
  }
  at::Tensor d = t.to(g->device);
  op(d);
  t.copy_(d.cpu());
}

}  // namespace

extern "C" {

// Connects to (or, with `is_server`, hosts) the TCPStore at host:port, then joins an NCCL group
// of `world` ranks under the store prefix `prefix` on CUDA device `device`. Returns NULL on
// success with *out set, else a malloc'ed message the caller frees.
char *pivot_nccl_new(const char *host, uint16_t port, bool is_server, int rank, int world,
                     const char *prefix, int64_t timeout_ms, int device, void **out) {
  return guarded("c10d::ProcessGroupNCCL", [&] {
    int devices = c10::cuda::device_count();
    if (device >= devices) {
      throw std::runtime_error("CUDA device " + std::to_string(device) + " does not exist (" +
                               std::to_string(devices) + " visible)");
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
    *out = new Group{store, pg, at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))};
  });
}

void pivot_nccl_free(void *group) {
  auto *g = as_group(group);
  try {
    g->pg->shutdown();
  } catch (...) {
  }
  delete g;
}

// op: 0 sum, 1 max. In place, on every rank.
char *pivot_nccl_allreduce(void *group, at::Tensor **tensors, int n, int op) {
  return guarded("allreduce", [&] {
    auto *g = as_group(group);
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    for (int i = 0; i < n; ++i) {
      on_device(g, *tensors[i], [&](at::Tensor &t) {
        std::vector<at::Tensor> one{t};
        g->pg->allreduce(one, o)->wait();
      });
    }
  });
}

char *pivot_nccl_broadcast(void *group, at::Tensor **tensors, int n, int root) {
  return guarded("broadcast", [&] {
    auto *g = as_group(group);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    for (int i = 0; i < n; ++i) {
      on_device(g, *tensors[i], [&](at::Tensor &t) {
        std::vector<at::Tensor> one{t};
        g->pg->broadcast(one, o)->wait();
      });
    }
  });
}

// As pivot_gloo_reduce_scatter: rank r receives the sum over the ranks of chunk r of `input`.
char *pivot_nccl_reduce_scatter(void *group, at::Tensor *output, at::Tensor *input) {
  return guarded("reduce_scatter", [&] {
    auto *g = as_group(group);
    c10d::ReduceScatterOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    at::Tensor in = input->is_cuda() ? *input : input->to(g->device);
    on_device(g, *output, [&](at::Tensor &out) { g->pg->_reduce_scatter_base(out, in, o)->wait(); });
  });
}

char *pivot_nccl_all_gather(void *group, at::Tensor *output, at::Tensor *input) {
  return guarded("all_gather", [&] {
    auto *g = as_group(group);
    at::Tensor in = input->is_cuda() ? *input : input->to(g->device);
    on_device(g, *output, [&](at::Tensor &out) { g->pg->_allgather_base(out, in)->wait(); });
  });
}

char *pivot_nccl_barrier(void *group) {
  return guarded("barrier", [&] { as_group(group)->pg->barrier()->wait(); });
}

}  // extern "C"
