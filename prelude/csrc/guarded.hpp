// Shared by the c10d shims (c10d_gloo.cpp, c10d_nccl.cpp): no C++ exception may cross the C ABI
// into Rust, so every entry point runs its body through `guarded`.
#pragma once

#include <cstring>
#include <exception>
#include <string>

namespace pivot_c10d {

// Runs `f`; returns NULL, or a malloc'ed "<what>: <message>" for the exception it threw (the
// caller frees it).
template <typename F>
char *guarded(const char *what, F f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception &e) {
    return strdup((std::string(what) + ": " + e.what()).c_str());
  } catch (...) {
    return strdup((std::string(what) + ": unknown C++ exception").c_str());
  }
}

}  // namespace pivot_c10d
