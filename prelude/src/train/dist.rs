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
//! The group is libtorch's own `c10d::ProcessGroupGloo` (what PyTorch DDP uses on CPU) through a
//! small C++ shim (`csrc/c10d_gloo.cpp`), compiled with the `c10d` feature (which `pivot-train`
//! turns on) where Gloo's headers are installed (`make gloo`: Debian's libgloo-dev); a build
//! without them says so when a run asks for more than one rank.

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

/// A group of processes (ranks) that run the same program on shards of the data.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    local_rank: usize,
    raw: shim::Raw,
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
    /// than one rank.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>> {
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
        if world == 1 {
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

/// Joins the group torchrun's environment describes (see the module doc) and makes it the
/// trainers' group; `None` when the program runs alone. Call once, before training.
pub fn init_from_env() -> Result<Option<&'static ProcessGroup>> {
    match Rendezvous::from_vars(|k| std::env::var(k).ok())? {
        Some(r) => init(&r).map(Some),
        None => Ok(None),
    }
}

/// Joins the group at `r` and makes it the trainers' group.
pub fn init(r: &Rendezvous) -> Result<&'static ProcessGroup> {
    if GROUP.get().is_some() {
        return Err(PivotError::invalid("the process group is already set up"));
    }
    let timeout_ms = std::env::var("PIVOT_DIST_TIMEOUT_S").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(300) * 1000;
    let is_server = !r.agent_store && r.rank == 0;
    let prefix = format!("pivot/{}/", r.restart);
    let raw = shim::new(&r.master_addr, r.master_port, is_server, r.rank, r.world, &prefix, timeout_ms)?;
    let pg = ProcessGroup { rank: r.rank, world: r.world, local_rank: r.local_rank, raw, reduced: AtomicU64::new(0), broadcast: AtomicU64::new(0), scattered: AtomicU64::new(0), gathered: AtomicU64::new(0) };
    let _ = GROUP.set(pg);
    Ok(GROUP.get().expect("just set"))
}

/// Whether this build can join a group of more than one rank.
pub fn available() -> bool {
    cfg!(pivot_c10d_gloo)
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
        shim::all_reduce(&self.raw, tensors, op)
    }

    /// Copies each tensor of rank `root` into the same tensor of every other rank.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        Self::count(&self.broadcast, tensors);
        shim::broadcast(&self.raw, tensors, root)
    }

    pub fn barrier(&self) -> Result<()> {
        shim::barrier(&self.raw)
    }

    /// Sums `input` (`world` equal chunks, contiguous) over the ranks and leaves chunk `rank` of
    /// the sum in `output` (one chunk, same kind).
    pub fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.check_chunks("reduce_scatter", output, input)?;
        Self::count(&self.scattered, &[input]);
        shim::reduce_scatter(&self.raw, output, input)
    }

    /// Fills `output` (`world` equal chunks) with every rank's `input` (one chunk), rank 0's
    /// first.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<()> {
        self.check_chunks("all_gather", input, output)?;
        Self::count(&self.gathered, &[output]);
        shim::all_gather(&self.raw, output, input)
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

#[cfg(pivot_c10d_gloo)]
mod shim {
    use super::ReduceOp;
    use crate::error::{PivotError, Result};
    use std::ffi::{CString, c_char, c_void};
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

    fn check(err: *mut c_char) -> Result<()> {
        if err.is_null() {
            return Ok(());
        }
        // SAFETY: a NUL-terminated string from strdup, freed once here.
        let msg = unsafe {
            let m = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            libc::free(err.cast());
            m
        };
        Err(PivotError::invalid(format!("c10d {msg}")))
    }

    fn c_string(s: &str) -> Result<CString> {
        CString::new(s).map_err(|_| PivotError::invalid(format!("`{s}` contains a NUL byte")))
    }

    pub(super) fn new(host: &str, port: u16, is_server: bool, rank: usize, world: usize, prefix: &str, timeout_ms: u64) -> Result<Raw> {
        let (host, prefix) = (c_string(host)?, c_string(prefix)?);
        let mut out = std::ptr::null_mut();
        // SAFETY: valid C strings and an out-pointer that lives for the call.
        check(unsafe { pivot_gloo_new(host.as_ptr(), port, is_server, rank as i32, world as i32, prefix.as_ptr(), timeout_ms as i64, &mut out) })?;
        Ok(Raw(out))
    }

    fn ptrs(tensors: &[&Tensor]) -> Vec<*const C_tensor> {
        tensors.iter().map(|t| t.as_ptr()).collect()
    }

    pub(super) fn all_reduce(raw: &Raw, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        let p = ptrs(tensors);
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
        };
        // SAFETY: live tch tensors (`at::Tensor*`) borrowed for the call; the group is live.
        check(unsafe { pivot_gloo_allreduce(raw.0, p.as_ptr(), p.len() as i32, op) })
    }

    pub(super) fn broadcast(raw: &Raw, tensors: &[&Tensor], root: usize) -> Result<()> {
        let p = ptrs(tensors);
        // SAFETY: as in all_reduce.
        check(unsafe { pivot_gloo_broadcast(raw.0, p.as_ptr(), p.len() as i32, root as i32) })
    }

    pub(super) fn barrier(raw: &Raw) -> Result<()> {
        // SAFETY: the group is live.
        check(unsafe { pivot_gloo_barrier(raw.0) })
    }

    pub(super) fn reduce_scatter(raw: &Raw, output: &Tensor, input: &Tensor) -> Result<()> {
        // SAFETY: as in all_reduce.
        check(unsafe { pivot_gloo_reduce_scatter(raw.0, output.as_ptr(), input.as_ptr()) })
    }

    pub(super) fn all_gather(raw: &Raw, output: &Tensor, input: &Tensor) -> Result<()> {
        // SAFETY: as in all_reduce.
        check(unsafe { pivot_gloo_all_gather(raw.0, output.as_ptr(), input.as_ptr()) })
    }
}

#[cfg(not(pivot_c10d_gloo))]
mod shim {
    use super::ReduceOp;
    use crate::error::{PivotError, Result};
    use tch::Tensor;

    pub(super) struct Raw;

    fn unavailable() -> PivotError {
        PivotError::invalid(
            "this build has no c10d Gloo backend: the prelude was compiled without its `c10d` feature, or \
             Gloo's headers were missing then (install them with `make gloo`, i.e. Debian's libgloo-dev, and rebuild)",
        )
    }

    pub(super) fn new(_: &str, _: u16, _: bool, _: usize, _: usize, _: &str, _: u64) -> Result<Raw> {
        Err(unavailable())
    }
    pub(super) fn all_reduce(_: &Raw, _: &[&Tensor], _: ReduceOp) -> Result<()> {
        Err(unavailable())
    }
    pub(super) fn broadcast(_: &Raw, _: &[&Tensor], _: usize) -> Result<()> {
        Err(unavailable())
    }
    pub(super) fn barrier(_: &Raw) -> Result<()> {
        Err(unavailable())
    }
    pub(super) fn reduce_scatter(_: &Raw, _: &Tensor, _: &Tensor) -> Result<()> {
        Err(unavailable())
    }
    pub(super) fn all_gather(_: &Raw, _: &Tensor, _: &Tensor) -> Result<()> {
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
        assert_eq!(Rendezvous::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(Rendezvous::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let r = Rendezvous::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29511"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world, r.local_rank, r.master_port, r.agent_store, r.restart), (1, 2, 1, 29511, true, 2));
        let r = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")])).unwrap().unwrap();
        assert!(!r.agent_store, "without the agent store rank 0 hosts it");
        let err = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")])).unwrap_err();
        assert!(err.to_string().contains("RANK"), "{err}");
        let err = Rendezvous::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")])).unwrap_err();
        assert!(err.to_string().contains("MASTER_ADDR"), "{err}");
    }
}
