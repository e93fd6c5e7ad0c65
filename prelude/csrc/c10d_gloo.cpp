// c10d's ProcessGroupGloo over a TCPStore, as torch.distributed builds it for torchrun's workers,
// reached from Rust (tch has no c10d binding). libtorch_cpu.so exports every symbol used here;
// Gloo's headers (which ProcessGroupGloo.hpp includes, and the torch wheel lacks) come from
// Debian's libgloo-dev at build time. Gloo itself is linked statically into libtorch_cpu: never
// link -lgloo. Tensors arrive as tch passes them: pointers to `at::Tensor`.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

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
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

std::vector<at::Tensor> gather(at::Tensor **ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace

extern "C" {

// Connects to (or, with `is_server`, hosts) the TCPStore at host:port, then joins a Gloo group of
// `world` ranks under the store prefix `prefix`. Returns NULL on success with *out set, else a
// malloc'ed message the caller frees.
char *pivot_gloo_new(const char *host, uint16_t port, bool is_server, int rank, int world,
                     const char *prefix, int64_t timeout_ms, void **out) {
  return guarded("c10d::ProcessGroupGloo", [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    options->threads = 1;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new Group{store, pg};
  });
}

void pivot_gloo_free(void *group) { delete static_cast<Group *>(group); }

// op: 0 sum, 1 max. In place, on every rank.
char *pivot_gloo_allreduce(void *group, at::Tensor **tensors, int n, int op) {
  return guarded("allreduce", [&] {
    auto ts = gather(tensors, n);
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    // Gloo's allreduce takes one tensor per call per device; a call per flat buffer.
    for (auto &t : ts) {
      std::vector<at::Tensor> one{t};
      static_cast<Group *>(group)->pg->allreduce(one, o)->wait();
    }
  });
}

char *pivot_gloo_broadcast(void *group, at::Tensor **tensors, int n, int root) {
  return guarded("broadcast", [&] {
    auto ts = gather(tensors, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    for (auto &t : ts) {
      std::vector<at::Tensor> one{t};
      static_cast<Group *>(group)->pg->broadcast(one, o)->wait();
    }
  });
}

// ZeRO-1's two halves of an all-reduce. `input` holds `world` equal chunks; rank r receives the
// sum over the ranks of chunk r in `output` (one chunk long). In place of nothing: two buffers.
char *pivot_gloo_reduce_scatter(void *group, at::Tensor *output, at::Tensor *input) {
  return guarded("reduce_scatter", [&] {
    c10d::ReduceScatterOptions o;
    o.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    static_cast<Group *>(group)->pg->_reduce_scatter_base(*output, *input, o)->wait();
  });
}

// `output` (world chunks) receives every rank's `input` (one chunk), in rank order.
char *pivot_gloo_all_gather(void *group, at::Tensor *output, at::Tensor *input) {
  return guarded("all_gather", [&] {
    static_cast<Group *>(group)->pg->_allgather_base(*output, *input)->wait();
  });
}

char *pivot_gloo_barrier(void *group) {
  return guarded("barrier", [&] { static_cast<Group *>(group)->pg->barrier()->wait(); });
}

}  // extern "C"
