use clap::Parser;

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` still overrides them): one arena
/// instead of four per CPU, whose partly used pages each thread's arena would otherwise keep
/// apart, and freed pages returned after one second instead of ten, by a background thread
/// rather than whenever an allocation happens to come by. At 10,000 objects the peak RSS of an
/// idle resync went from 61 to 58.5 MiB; the operator's few threads do not contend on one arena.
#[cfg(not(target_env = "msvc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"narenas:1,background_thread:true,dirty_decay_ms:1000".as_ptr() });

fn main() -> std::process::ExitCode {
    kmsgrant::cli::Cli::parse().run()
}
