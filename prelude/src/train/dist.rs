//! Data parallelism over c10d: a process group that every trainer uses once it is set up, as
//! `torch.distributed.init_process_group` sets the default group.
//!
//! `torchrun --nproc-per-node N --no-python pivot-train CONFIG` starts N copies of a program;
//! [`init_from_env`] reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` as
//! torchrun sets them and joins a Gloo group through a TCPStore following torchrun's store rule
//! (`TORCHELASTIC_USE_AGENT_STORE=True`: every rank is a client of the agent's store; otherwise
//! rank 0 hosts it). Without those variables (or with `WORLD_SIZE=1`) nothing is set up and the
//! trainers run alone.
//!
//! The group is libtorch's own `c10d::ProcessGroupGloo` (what PyTorch DDP uses on CPU) or
//! `c10d::ProcessGroupNCCL` (on CUDA), each through a small C++ shim (`csrc/c10d_gloo.cpp`,
//! `csrc/c10d_nccl.cpp`) compiled with the `c10d` feature (which `pivot-train` turns on): Gloo's
//! where its headers are installed (`make gloo`: Debian's libgloo-dev), NCCL's where the CUDA
//! headers are (`make cuda-headers`), on any machine, GPU or not. A build without one says so
//! when a run asks for it. [`Backend::for_device`] is torch's rule: NCCL for CUDA, Gloo otherwise.
//!
//! The NCCL shim is a shared library linked to `libtorch_cuda.so`, embedded in the crate and
//! loaded (from memory, through memfd) the first time a run asks for NCCL, so programs that never
//! do keep from loading the CUDA libraries. NCCL reduces CUDA tensors only; the few small CPU
//! tensors the trainers all-reduce (stop flags, metrics, gradient-norm squares) go through the
//! rank's GPU and back.

use crate::error::{PivotError, Result};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// How a reduction combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// The c10d backend that carries a group's collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `c10d::ProcessGroupGloo`: CPU tensors (and CUDA ones, through host copies).
    Gloo,
    /// `c10d::ProcessGroupNCCL`: CUDA tensors, one GPU per rank (`LOCAL_RANK`).
    Nccl,
}

impl Backend {
    /// What torch.distributed picks: NCCL for a CUDA device, Gloo otherwise.
    pub fn for_device(device: tch::Device) -> Backend {
        if device.is_cuda() { Backend::Nccl } else { Backend::Gloo }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

/// The collectives of a shim's handle (Gloo's or NCCL's; [`Unbuilt`] for a shim this build lacks).
trait Collectives {
    fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()>;
    fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<()>;
    fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()>;
}

/// The handle of a shim this build lacks. Its `new` always fails (saying why), so no value of it
/// exists and its collectives are unreachable: one stand-in for both shims.
#[cfg(any(not(pivot_c10d_gloo), not(pivot_c10d_nccl)))]
enum Unbuilt {}

#[cfg(any(not(pivot_c10d_gloo), not(pivot_c10d_nccl)))]
impl Collectives for Unbuilt {
    fn all_reduce(&self, _: &[&Tensor], _: ReduceOp) -> Result<()> {
        match *self {}
    }
    fn broadcast(&self, _: &[&Tensor], _: usize) -> Result<()> {
        match *self {}
    }
    fn barrier(&self) -> Result<()> {
        match *self {}
    }
    fn reduce_scatter(&self, _: &Tensor, _: &Tensor) -> Result<()> {
        match *self {}
    }
    fn all_gather(&self, _: &Tensor, _: &Tensor) -> Result<()> {
        match *self {}
    }
}

/// A group of processes (ranks) that run the same program on shards of the data.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    local_rank: usize,
    backend: Backend,
    raw: Box<dyn Collectives>,
    /// Payload bytes this rank put into all-reduces and broadcasts (what the benchmark reports).
    reduced: AtomicU64,
    broadcast: AtomicU64,
    /// Payload bytes of reduce-scatters (the whole input) and all-gathers (the whole output):
    /// ZeRO-1's halves of an all-reduce.
    scattered: AtomicU64,
    gathered: AtomicU64,
}

// SAFETY: c10d process groups are thread-safe (their work runs on Gloo's own threads); the
// handle is only freed at process exit (the group lives in a static).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

/// Where a rank finds the others, as torchrun describes it in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`); otherwise rank 0.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: keeps the keys of a restarted group apart from the last one's.
    pub restart: usize,
}

impl Rendezvous {
    /// Reads torchrun's variables through `var`; `None` when no launcher set a world of more
    /// than one rank (with `single`, of at least one: a one-rank group, so a run on one GPU goes
    /// through the collectives a larger one uses).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, single: bool) -> Result<Option<Rendezvous>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let num = |name: &str, default: Option<usize>| -> Result<usize> {
            match (var(name), default) {
                (Some(v), _) => v.trim().parse().map_err(|_| PivotError::config("environment", name, format!("`{v}` is not a number"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(PivotError::config("environment", name, "is not set, but WORLD_SIZE is")),
            }
        };
        let world = world.trim().parse::<usize>().map_err(|_| PivotError::config("environment", "WORLD_SIZE", format!("`{world}` is not a number")))?;
        if world == 0 {
            return Err(PivotError::config("environment", "WORLD_SIZE", "must be at least 1"));
        }
        if world == 1 && !single {
            return Ok(None);
        }
        let rank = num("RANK", None)?;
        if rank >= world {
            return Err(PivotError::config("environment", "RANK", format!("{rank} is not below WORLD_SIZE {world}")));
        }
        let master_port = num("MASTER_PORT", None)?;
        let master_port = u16::try_from(master_port).map_err(|_| PivotError::config("environment", "MASTER_PORT", format!("{master_port} is not a port")))?;
        Ok(Some(Rendezvous {
            rank,
            world,
            local_rank: num("LOCAL_RANK", Some(rank))?,
            master_addr: var("MASTER_ADDR").ok_or_else(|| PivotError::config("environment", "MASTER_ADDR", "is not set, but WORLD_SIZE is"))?,
            master_port,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True"),
            restart: num("TORCHELASTIC_RESTART_COUNT", Some(0))?,
        }))
    }
}

static GROUP: OnceLock<ProcessGroup> = OnceLock::new();

/// The group the trainers use, once [`init_from_env`] or [`init`] set one up.
pub fn group() -> Option<&'static ProcessGroup> {
    GROUP.get()
}

/// Joins the group torchrun's environment describes (see the module doc) over `backend` and makes
/// it the trainers' group; `None` when the program runs alone (with `single`, only without a
/// launcher: a launcher's one-rank world becomes a one-rank group). Call once, before training.
pub fn init_from_env(backend: Backend, single: bool) -> Result<Option<&'static ProcessGroup>> {
    match Rendezvous::from_vars(|k| std::env::var(k).ok(), single)? {
        Some(r) => init(&r, backend).map(Some),
        None => Ok(None),
    }
}

/// Joins the group at `r` over `backend` and makes it the trainers' group (NCCL: on GPU
/// `r.local_rank`).
pub fn init(r: &Rendezvous, backend: Backend) -> Result<&'static ProcessGroup> {
    if GROUP.get().is_some() {
        return Err(PivotError::invalid("the process group is already set up"));
    }
    let timeout_ms = std::env::var("PIVOT_DIST_TIMEOUT_S").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(300) * 1000;
    let is_server = !r.agent_store && r.rank == 0;
    let prefix = format!("pivot/{}/", r.restart);
    let raw = match backend {
        Backend::Gloo => Box::new(gloo::new(&r.master_addr, r.master_port, is_server, r.rank, r.world, &prefix, timeout_ms)?) as Box<dyn Collectives>,
        Backend::Nccl => Box::new(nccl::new(&r.master_addr, r.master_port, is_server, r.rank, r.world, &prefix, timeout_ms, r.local_rank)?),
    };
    let pg = ProcessGroup { rank: r.rank, world: r.world, local_rank: r.local_rank, backend, raw, reduced: AtomicU64::new(0), broadcast: AtomicU64::new(0), scattered: AtomicU64::new(0), gathered: AtomicU64::new(0) };
    let _ = GROUP.set(pg);
    Ok(GROUP.get().expect("just set"))
}

/// Whether this build can join a group of more than one rank over Gloo.
pub fn available() -> bool {
    cfg!(pivot_c10d_gloo)
}

/// Whether a group over `backend` can be set up in this process, and if not, why: the shim was
/// not built, cannot be loaded, or (NCCL) no GPU is visible. Loads the NCCL shim, resolving every
/// symbol it needs from libtorch_cuda.so.
pub fn backend_usable(backend: Backend) -> Result<()> {
    match backend {
        Backend::Gloo => gloo::usable(),
        Backend::Nccl => nccl::usable(0),
    }
}

impl ProcessGroup {
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Payload bytes this rank has put into all-reduces so far (a ring all-reduce moves about
    /// twice that over the wire per rank).
    pub fn bytes_all_reduced(&self) -> u64 {
        self.reduced.load(Ordering::Relaxed)
    }
    /// Payload bytes of the broadcasts so far (the weights at the start of each run).
    pub fn bytes_broadcast(&self) -> u64 {
        self.broadcast.load(Ordering::Relaxed)
    }

    /// Payload bytes of the reduce-scatters so far (their inputs, `world` chunks each).
    pub fn bytes_reduce_scattered(&self) -> u64 {
        self.scattered.load(Ordering::Relaxed)
    }
    /// Payload bytes of the all-gathers so far (their outputs, `world` chunks each).
    pub fn bytes_all_gathered(&self) -> u64 {
        self.gathered.load(Ordering::Relaxed)
    }

    fn count(counter: &AtomicU64, tensors: &[&Tensor]) {
        let n: usize = tensors.iter().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum();
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Reduces each tensor in place over all ranks (every rank gets the result). Tensors must be
    /// contiguous.
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        Self::count(&self.reduced, tensors);
        self.raw.all_reduce(tensors, op)
    }

    /// Copies each tensor of rank `root` into the same tensor of every other rank.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        Self::count(&self.broadcast, tensors);
        self.raw.broadcast(tensors, root)
    }

    pub fn barrier(&self) -> Result<()> {
        self.raw.barrier()
    }

    /// Sums `input` (`world` equal chunks, contiguous) over the ranks and leaves chunk `rank` of
    /// the sum in `output` (one chunk, same kind).
    pub fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.check_chunks("reduce_scatter", output, input)?;
        Self::count(&self.scattered, &[input]);
        self.raw.reduce_scatter(output, input)
    }

    /// Fills `output` (`world` equal chunks) with every rank's `input` (one chunk), rank 0's
    /// first.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.check_chunks("all_gather", input, output)?;
        Self::count(&self.gathered, &[output]);
        self.raw.all_gather(output, input)
    }

    /// A clear error instead of Gloo's for the mistakes a caller can make.
    fn check_chunks(&self, what: &str, chunk: &Tensor, whole: &Tensor) -> Result<()> {
        let ok = chunk.numel() * self.world == whole.numel() && chunk.kind() == whole.kind() && chunk.is_contiguous() && whole.is_contiguous();
        if ok {
            Ok(())
        } else {
            Err(PivotError::invalid(format!(
                "{what}: needs contiguous tensors of one kind, the whole {} times the chunk; got {:?} {:?} and {:?} {:?}",
                self.world,
                whole.size(),
                whole.kind(),
                chunk.size(),
                chunk.kind()
            )))
        }
    }
}

/// What both c10d shims' Rust sides share: the C ABI's conventions (an error is a strdup'ed
/// string, freed here; tensors go as `at::Tensor*` arrays; ops as small integers).
#[cfg(any(pivot_c10d_gloo, pivot_c10d_nccl))]
mod shim {
    use super::ReduceOp;
    use crate::error::{PivotError, Result};
    use std::ffi::{CStr, CString, c_char};
    use tch::Tensor;
    use torch_sys::C_tensor;

    /// A shim call's result: null is success, else the error message it allocated.
    pub(super) fn check(err: *mut c_char) -> Result<()> {
        if err.is_null() {
            return Ok(());
        }
        // SAFETY: a NUL-terminated string from strdup, freed once here.
        let msg = unsafe {
            let m = CStr::from_ptr(err).to_string_lossy().into_owned();
            libc::free(err.cast());
            m
        };
        Err(PivotError::invalid(format!("c10d {msg}")))
    }

    pub(super) fn c_string(s: &str) -> Result<CString> {
        CString::new(s).map_err(|_| PivotError::invalid(format!("`{s}` contains a NUL byte")))
    }

    pub(super) fn ptrs(tensors: &[&Tensor]) -> Vec<*const C_tensor> {
        tensors.iter().map(|t| t.as_ptr()).collect()
    }

    /// The op's number in the shims' `allreduce` (csrc/c10d_*.cpp).
    pub(super) fn op_code(op: ReduceOp) -> i32 {
        match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
        }
    }
}

#[cfg(pivot_c10d_gloo)]
mod gloo {
    use super::ReduceOp;
    use super::shim::{c_string, check, op_code, ptrs};
    use crate::error::Result;
    use std::ffi::{c_char, c_void};
    use tch::Tensor;
    use torch_sys::C_tensor;

    pub(super) struct Raw(*mut c_void);

    impl Drop for Raw {
        fn drop(&mut self) {
            // SAFETY: a handle from pivot_gloo_new, freed once.
            unsafe { pivot_gloo_free(self.0) }
        }
    }

    unsafe extern "C" {
        // csrc/c10d_gloo.cpp: each returns NULL or a malloc'ed error message.
        fn pivot_gloo_new(
            host: *const c_char,
            port: u16,
            is_server: bool,
            rank: i32,
            world: i32,
            prefix: *const c_char,
            timeout_ms: i64,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        fn pivot_gloo_free(group: *mut c_void);
        fn pivot_gloo_allreduce(group: *mut c_void, tensors: *const *const C_tensor, n: i32, op: i32) -> *mut c_char;
        fn pivot_gloo_broadcast(group: *mut c_void, tensors: *const *const C_tensor, n: i32, root: i32) -> *mut c_char;
        fn pivot_gloo_barrier(group: *mut c_void) -> *mut c_char;
        fn pivot_gloo_reduce_scatter(group: *mut c_void, output: *const C_tensor, input: *const C_tensor) -> *mut c_char;
        fn pivot_gloo_all_gather(group: *mut c_void, output: *const C_tensor, input: *const C_tensor) -> *mut c_char;
    }

    pub(super) fn usable() -> Result<()> {
        Ok(())
    }

    pub(super) fn new(host: &str, port: u16, is_server: bool, rank: usize, world: usize, prefix: &str, timeout_ms: u64) -> Result<Raw> {
        let (host, prefix) = (c_string(host)?, c_string(prefix)?);
        let mut out = std::ptr::null_mut();
        // SAFETY: valid C strings and an out-pointer that lives for the call.
        check(unsafe { pivot_gloo_new(host.as_ptr(), port, is_server, rank as i32, world as i32, prefix.as_ptr(), timeout_ms as i64, &mut out) })?;
        Ok(Raw(out))
    }

    impl super::Collectives for Raw {
        fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
            let p = ptrs(tensors);
            // SAFETY: live tch tensors (`at::Tensor*`) borrowed for the call; the group is live.
            check(unsafe { pivot_gloo_allreduce(self.0, p.as_ptr(), p.len() as i32, op_code(op)) })
        }

        fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
            let p = ptrs(tensors);
            // SAFETY: as in all_reduce.
            check(unsafe { pivot_gloo_broadcast(self.0, p.as_ptr(), p.len() as i32, root as i32) })
        }

        fn barrier(&self) -> Result<()> {
            // SAFETY: the group is live.
            check(unsafe { pivot_gloo_barrier(self.0) })
        }

        fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<()> {
            // SAFETY: as in all_reduce.
            check(unsafe { pivot_gloo_reduce_scatter(self.0, output.as_ptr(), input.as_ptr()) })
        }

        fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
            // SAFETY: as in all_reduce.
            check(unsafe { pivot_gloo_all_gather(self.0, output.as_ptr(), input.as_ptr()) })
        }
    }
}

#[cfg(not(pivot_c10d_gloo))]
mod gloo {
    use crate::error::{PivotError, Result};

    pub(super) type Raw = super::Unbuilt;

    fn unavailable() -> PivotError {
        PivotError::invalid(
            "this build has no c10d Gloo backend: the prelude was compiled without its `c10d` feature, or \
             Gloo's headers were missing then (install them with `make gloo`, i.e. Debian's libgloo-dev, and rebuild)",
        )
    }

    pub(super) fn usable() -> Result<()> {
        Err(unavailable())
    }
    pub(super) fn new(_: &str, _: u16, _: bool, _: usize, _: usize, _: &str, _: u64) -> Result<Raw> {
        Err(unavailable())
    }
}

/// The NCCL shim: csrc/c10d_nccl.cpp as a shared library (build.rs), embedded here and loaded on
/// first use; the same functions as the Gloo shim's, reached through dlsym.
#[cfg(pivot_c10d_nccl)]
mod nccl {
    use super::ReduceOp;
    use super::shim::{c_string, check, op_code, ptrs};
    use crate::error::{PivotError, Result};
    use std::ffi::{CStr, CString, c_char, c_int, c_void};
    use std::sync::OnceLock;
    use tch::Tensor;
    use torch_sys::C_tensor;

    static LIBRARY: &[u8] = include_bytes!(env!("PIVOT_C10D_NCCL_SO"));

    type New = unsafe extern "C" fn(*const c_char, u16, bool, i32, i32, *const c_char, i64, i32, *mut *mut c_void) -> *mut c_char;
    type Many = unsafe extern "C" fn(*mut c_void, *const *const C_tensor, i32, i32) -> *mut c_char;
    type Two = unsafe extern "C" fn(*mut c_void, *const C_tensor, *const C_tensor) -> *mut c_char;

    pub(super) struct Api {
        new: New,
        free: unsafe extern "C" fn(*mut c_void),
        allreduce: Many,
        broadcast: Many,
        reduce_scatter: Two,
        all_gather: Two,
        barrier: unsafe extern "C" fn(*mut c_void) -> *mut c_char,
    }

    fn dlerror() -> String {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc.
        let e = unsafe { libc::dlerror() };
        if e.is_null() { "unknown dlopen error".into() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned() }
    }

    fn open() -> std::result::Result<Api, String> {
        if !crate::device::load_cuda_runtime() {
            return Err("libtorch_cuda.so could not be loaded (a CPU-only libtorch?)".into());
        }
        // SAFETY: plain syscalls on a file descriptor this function owns; the library is written
        // whole before dlopen reads it, and the mapping outlives the descriptor.
        unsafe {
            let fd = libc::memfd_create(c"pivot_c10d_nccl".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
            }
            let mut written = 0;
            while written < LIBRARY.len() {
                let n = libc::write(fd, LIBRARY[written..].as_ptr().cast(), LIBRARY.len() - written);
                if n <= 0 {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    return Err(format!("writing the NCCL shim to memfd: {e}"));
                }
                written += n as usize;
            }
            let path = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
            let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            libc::close(fd);
            if handle.is_null() {
                return Err(format!("loading the NCCL shim: {}", dlerror()));
            }
            let sym = |name: &CStr| -> std::result::Result<*mut c_void, String> {
                let p = libc::dlsym(handle, name.as_ptr());
                if p.is_null() { Err(format!("the NCCL shim lacks {}: {}", name.to_string_lossy(), dlerror())) } else { Ok(p) }
            };
            Ok(Api {
                new: std::mem::transmute::<*mut c_void, New>(sym(c"pivot_nccl_new")?),
                free: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void)>(sym(c"pivot_nccl_free")?),
                allreduce: std::mem::transmute::<*mut c_void, Many>(sym(c"pivot_nccl_allreduce")?),
                broadcast: std::mem::transmute::<*mut c_void, Many>(sym(c"pivot_nccl_broadcast")?),
                reduce_scatter: std::mem::transmute::<*mut c_void, Two>(sym(c"pivot_nccl_reduce_scatter")?),
                all_gather: std::mem::transmute::<*mut c_void, Two>(sym(c"pivot_nccl_all_gather")?),
                barrier: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_void) -> *mut c_char>(sym(c"pivot_nccl_barrier")?),
            })
        }
    }

    /// The shim's functions, loaded once per process.
    pub(super) fn load() -> Result<&'static Api> {
        static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
        API.get_or_init(open).as_ref().map_err(|e| PivotError::invalid(format!("c10d NCCL: {e}")))
    }

    /// The shim loads and GPU `device` exists.
    pub(super) fn usable(device: usize) -> Result<()> {
        load()?;
        let count = if crate::device::cuda_available() { tch::Cuda::device_count() as usize } else { 0 };
        if device < count {
            return Ok(());
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").map(|v| format!(" (CUDA_VISIBLE_DEVICES=`{v}`)")).unwrap_or_default();
        Err(PivotError::invalid(if count == 0 {
            format!("c10d NCCL needs a CUDA device, and none is visible to this process{visible}: use backend = \"gloo\" or device = \"cpu\" on a machine without a GPU")
        } else {
            format!("c10d NCCL needs CUDA device {device} (LOCAL_RANK), but only {count} are visible{visible}: start at most {count} ranks per node")
        }))
    }

    pub(super) struct Raw(*mut c_void);

    impl Drop for Raw {
        fn drop(&mut self) {
            if let Ok(api) = load() {
                // SAFETY: a handle from pivot_nccl_new, freed once.
                unsafe { (api.free)(self.0) }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(host: &str, port: u16, is_server: bool, rank: usize, world: usize, prefix: &str, timeout_ms: u64, device: usize) -> Result<Raw> {
        usable(device)?;
        let api = load()?;
        let (host, prefix) = (c_string(host)?, c_string(prefix)?);
        let mut out = std::ptr::null_mut();
        // SAFETY: valid C strings and an out-pointer that lives for the call.
        check(unsafe { (api.new)(host.as_ptr(), port, is_server, rank as i32, world as i32, prefix.as_ptr(), timeout_ms as i64, device as c_int, &mut out) })?;
        Ok(Raw(out))
    }

    impl super::Collectives for Raw {
        fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
            let p = ptrs(tensors);
            // SAFETY: live tch tensors (`at::Tensor*`) borrowed for the call; the group is live.
            check(unsafe { (load()?.allreduce)(self.0, p.as_ptr(), p.len() as i32, op_code(op)) })
        }

        fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
            let p = ptrs(tensors);
            // SAFETY: as in all_reduce.
            check(unsafe { (load()?.broadcast)(self.0, p.as_ptr(), p.len() as i32, root as i32) })
        }

        fn barrier(&self) -> Result<()> {
            // SAFETY: the group is live.
            check(unsafe { (load()?.barrier)(self.0) })
        }

        fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<()> {
            // SAFETY: as in all_reduce.
            check(unsafe { (load()?.reduce_scatter)(self.0, output.as_ptr(), input.as_ptr()) })
        }

        fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
            // SAFETY: as in all_reduce.
            check(unsafe { (load()?.all_gather)(self.0, output.as_ptr(), input.as_ptr()) })
        }
    }
}

/// A build without the NCCL shim: every call says why it is missing.
#[cfg(not(pivot_c10d_nccl))]
mod nccl {
    use crate::error::{PivotError, Result};

    pub(super) type Raw = super::Unbuilt;

    fn unavailable() -> PivotError {
        let reason = option_env!("PIVOT_NCCL_MISSING").unwrap_or("the prelude was compiled without its `c10d` feature");
        PivotError::invalid(format!("built without NCCL: {reason}"))
    }

    pub(super) fn usable(_: usize) -> Result<()> {
        Err(unavailable())
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(_: &str, _: u16, _: bool, _: usize, _: usize, _: &str, _: u64, _: usize) -> Result<Raw> {
        Err(unavailable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_and_the_store_rule() {
        assert_eq!(Rendezvous::from_vars(vars(&[]), false).unwrap(), None);
        assert_eq!(Rendezvous::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")]), false).unwrap(), None);
        let one = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]), true).unwrap().unwrap();
        assert_eq!((one.rank, one.world), (0, 1), "`single`: a launcher's one-rank world is a group");
        assert_eq!(Rendezvous::from_vars(vars(&[]), true).unwrap(), None, "without a launcher there is no group");
        let r = Rendezvous::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29511"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]), false)
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank, r.master_port, r.agent_store, r.restart), (1, 2, 1, 29511, true, 2));
        let r = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]), false).unwrap().unwrap();
        assert!(!r.agent_store, "without the agent store rank 0 hosts it");
        let err = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]), false).unwrap_err();
        assert!(err.to_string().contains("RANK"), "{err}");
        let err = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")]), false).unwrap_err();
        assert!(err.to_string().contains("MASTER_ADDR"), "{err}");
    }

    #[test]
    fn the_backend_follows_the_device_and_reads_from_toml_names() {
        assert_eq!(Backend::for_device(tch::Device::Cpu), Backend::Gloo);
        assert_eq!(Backend::for_device(tch::Device::Cuda(1)), Backend::Nccl);
        let b: Backend = serde_json::from_str("\"nccl\"").unwrap();
        assert_eq!((b, b.to_string()), (Backend::Nccl, "nccl".to_string()));
    }

    /// The NCCL shim, built on this machine whether it has a GPU or not, loads with every symbol
    /// resolved against libtorch_cuda.so; without a GPU, asking for a group says that, not crash.
    #[test]
    fn nccl_shim_loads_and_without_a_gpu_says_so() {
        if !cfg!(pivot_c10d_nccl) {
            let err = backend_usable(Backend::Nccl).unwrap_err().to_string();
            assert!(err.contains("built without NCCL: "), "{err}");
            return;
        }
        #[cfg(pivot_c10d_nccl)]
        nccl::load().expect("the embedded NCCL shim loads");
        if crate::device::cuda_available() {
            backend_usable(Backend::Nccl).expect("a GPU is visible");
            return;
        }
        let err = backend_usable(Backend::Nccl).unwrap_err().to_string();
        assert!(err.contains("NCCL needs a CUDA device") && err.contains("none is visible"), "{err}");
        let r = Rendezvous { rank: 0, world: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: 1, agent_store: false, restart: 0 };
        let err = init(&r, Backend::Nccl).err().expect("no group without a GPU").to_string();
        assert!(err.contains("NCCL needs a CUDA device"), "{err}");
    }
}
