//! `pagefold serve`: the host service of issue 15 as a program. Listens on a
//! Unix socket, folds the guest memory of the VMM processes that attach
//! (background scanning), prints what it holds every few seconds, and on
//! SIGINT, SIGTERM or SIGHUP stops, removing its socket file. Never takes
//! over a socket another service still answers on.

use std::{
    error::Error,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::Args;
use pagefold::{
    dedup::ScanBudget,
    service::{Service, ServiceOptions, ServiceStats},
};

/// `pagefold serve`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// The socket to listen on. Default: /run/pagefold.sock where /run is
    /// writable, else $XDG_RUNTIME_DIR/pagefold.sock, else
    /// /tmp/pagefold.sock.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
    /// Pages the background scanner visits per step, per merge domain.
    #[arg(long, default_value_t = 65536)]
    pub(crate) scan_pages: u64,
    /// Pause between background scan steps, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub(crate) interval_ms: u64,
    /// How long a VMM process has to acknowledge a remap before its window
    /// is rolled back, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub(crate) ack_deadline_ms: u64,
    /// A user id allowed to attach besides the service's own (root always
    /// may); repeat for more.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub(crate) allow_uid: Vec<u32>,
    /// Time between two stats lines, in milliseconds.
    #[arg(long, default_value_t = 5000, hide = true)]
    pub(crate) stats_every_ms: u64,
}

/// Where the service listens when no `--socket` is given.
pub(crate) fn default_socket() -> PathBuf {
    // SAFETY: access reads a NUL-terminated path literal and changes nothing.
    if unsafe { libc::access(c"/run".as_ptr(), libc::W_OK) } == 0 {
        return PathBuf::from("/run/pagefold.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("pagefold.sock"),
        _ => PathBuf::from("/tmp/pagefold.sock"),
    }
}

/// Errors of `pagefold serve` before it serves.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// Another service answers on the socket.
    #[error("another service is listening on {}; stop it or give --socket", path.display())]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// The service could not start on the socket.
    #[error("cannot serve on {}: {source}", path.display())]
    Start {
        /// The socket.
        path: PathBuf,
        /// What the service said.
        source: pagefold::service::ServiceError,
    },
    /// The stop signals could not be blocked for `sigtimedwait`.
    #[error("blocking SIGINT/SIGTERM/SIGHUP for the signal wait failed: {0}")]
    Signals(std::io::Error),
}

fn stats_line(s: &ServiceStats) -> String {
    format!(
        "vms={} domains={} shared_bytes={} guest_bytes={} pages_merged={}",
        s.vms, s.domains, s.shared_bytes, s.guest_bytes, s.pages_merged
    )
}

fn stop_signals() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: 1. sigemptyset initialises the whole set it is given; 2. the
    // pointer is to a local of the right type; sigaddset only sets bits of
    // that initialised set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP);
        set.assume_init()
    }
}

/// Runs the service until a stop signal.
pub(crate) fn run(args: &ServeArgs) -> Result<(), Box<dyn Error>> {
    let path = args.socket.clone().unwrap_or_else(default_socket);
    if UnixStream::connect(&path).is_ok() {
        return Err(ServeError::InUse { path }.into());
    }
    // Blocked before any thread starts, so every thread of the service
    // inherits the mask and the signals wait for `sigtimedwait` below
    // instead of ending the process without dropping the service.
    let set = stop_signals();
    // SAFETY: `set` is an initialised signal set; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(ServeError::Signals(std::io::Error::from_raw_os_error(rc)).into());
    }
    let service = Service::start(
        &path,
        ServiceOptions {
            ack_deadline: Duration::from_millis(args.ack_deadline_ms),
            allowed_uids: args.allow_uid.clone(),
            background: Some((
                ScanBudget::Pages(args.scan_pages.max(1)),
                Duration::from_millis(args.interval_ms),
            )),
            ..ServiceOptions::default()
        },
    )
    .map_err(|source| ServeError::Start {
        path: path.clone(),
        source,
    })?;
    println!("pagefold serve: listening on {}", service.path().display());
    let every = Duration::from_millis(args.stats_every_ms.max(10));
    let mut next = Instant::now() + every;
    loop {
        let left = next.saturating_duration_since(Instant::now());
        let timeout = libc::timespec {
            tv_sec: left.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_nsec: left.subsec_nanos().into(),
        };
        // SAFETY: `set` and `timeout` are initialised locals; no siginfo is
        // asked for (null is allowed).
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            println!("pagefold serve: signal {sig}, stopping");
            break;
        }
        if Instant::now() >= next {
            next += every;
            match service.stats() {
                Ok(s) => println!("{}", stats_line(&s)),
                Err(e) => eprintln!("pagefold serve: stats: {e}"),
            }
        }
    }
    // Dropping the service joins its accept thread and removes the socket.
    drop(service);
    Ok(())
}
