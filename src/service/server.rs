//! The host service: folds the guest memory of many VMM processes. It
//! listens on a Unix socket; each process hands over its guest memfd, its
//! userfaultfd and a control page (SCM_RIGHTS), is identified by its
//! credentials (SO_PEERCRED), and gets back a read-only descriptor of its
//! merge domain's shared frames. Every domain is one [`DedupHost`] on a
//! memfd of its own, so the engine is the in-process one; the processes
//! follow its merges through `ConnMapper` (`mapper.rs`).

use std::{
    collections::HashMap,
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{
    control::ControlPage,
    error::ServiceError,
    mapper::{ClientRegion, ConnMapper, VmMappers},
    socket::{Conn, PeerCred},
    wire::{ErrorMsg, Hello, Message, Welcome},
};
use crate::{
    dedup::remote::RemoteMapper,
    dedup::{DedupHost, DedupOptions, DomainId, ScanBudget, ScanReport, VmId, VmOptions},
    frames::{memfd, FrameStore, StoreOptions},
    memory::GuestMemory,
    userfault::Userfault,
};

/// How a [`Service`] runs.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// How long a VMM process has to acknowledge a remap before its window
    /// is rolled back (and, for one it took, before the process is given
    /// up on for merging).
    pub ack_deadline: Duration,
    /// User ids allowed to connect besides the service's own (root always
    /// may).
    pub allowed_uids: Vec<u32>,
    /// The largest guest memory one process may put under the service: the
    /// service keeps 12 bytes of state per page of it.
    pub max_guest_bytes: u64,
    /// Most VMs at once.
    pub max_vms: usize,
    /// Background scanning: a budget per step and the pause between steps
    /// (`None`: the service merges only when [`Service::merge_now`] asks).
    pub background: Option<(ScanBudget, Duration)>,
    /// Options of each domain's dedup host.
    pub dedup: DedupOptions,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            ack_deadline: Duration::from_millis(500),
            allowed_uids: Vec::new(),
            max_guest_bytes: 1 << 40,
            max_vms: 4096,
            background: None,
            dedup: DedupOptions::default(),
        }
    }
}

/// What the service holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// VMM processes attached.
    pub vms: usize,
    /// Merge domains with at least one VM (or shared frames left).
    pub domains: usize,
    /// Bytes the kernel holds for the domains' shared frames (`fstat`).
    pub shared_bytes: u64,
    /// Bytes the kernel holds for the attached VMs' own memfds (`fstat`).
    pub guest_bytes: u64,
    /// Guest pages mapping a shared frame or released as zero.
    pub pages_merged: u64,
}

/// A merge domain: its dedup host, whose frame store holds the domain's
/// shared frames, and a read-only descriptor of that store for clients.
struct Domain {
    host: DedupHost,
    shared_read_only: OwnedFd,
}

struct VmRecord {
    domain: Arc<Domain>,
    id: VmId,
    mappers: Arc<VmMappers>,
    peer: PeerCred,
    /// The memfd's device and inode, which a second mapper's must match.
    inode: (u64, u64),
    regions: Vec<super::wire::RegionDesc>,
}

struct State {
    options: ServiceOptions,
    /// Domains by (user id, the domain number the process asked for): a
    /// process can only ever share with processes of its own user.
    domains: Mutex<HashMap<(u32, u64), Arc<Domain>>>,
    vms: Mutex<HashMap<u64, VmRecord>>,
    next_vm: AtomicU64,
    stop: AtomicBool,
    uid: u32,
    /// Every connection, by number, to close them all when the service
    /// stops.
    conns: Mutex<HashMap<u64, UnixStream>>,
    next_conn: AtomicU64,
}

/// The host service, listening on its socket.
pub struct Service {
    state: Arc<State>,
    path: PathBuf,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("path", &self.path).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every structure behind these locks is consistent between statements.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Service {
    /// Starts the service on a new socket at `path` (an existing socket
    /// file there is replaced). The process is made non-dumpable first, so
    /// a process of the same user cannot take its descriptors (every VM's
    /// memory) through `/proc/PID/fd` or ptrace.
    pub fn start(path: &Path, options: ServiceOptions) -> Result<Service, ServiceError> {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(ServiceError::Os {
                op: "prctl(PR_SET_DUMPABLE, 0)",
                source: std::io::Error::last_os_error(),
            });
        }
        if path.exists() {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ServiceError::Os {
            op: "bind the service socket",
            source,
        })?;
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let state = Arc::new(State {
            options,
            domains: Mutex::new(HashMap::new()),
            vms: Mutex::new(HashMap::new()),
            next_vm: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            uid,
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let accept_state = Arc::clone(&state);
        let acceptor = std::thread::Builder::new()
            .name("pagefold-service".into())
            .spawn(move || accept_loop(&accept_state, &listener))
            .map_err(|source| ServiceError::Os {
                op: "spawn the service's accept thread",
                source,
            })?;
        Ok(Service {
            state,
            path: path.to_owned(),
            acceptor: Some(acceptor),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Visits every page of every attached VM now and merges what it can,
    /// domain by domain.
    pub fn merge_now(&self) -> Result<ScanReport, ServiceError> {
        let domains: Vec<Arc<Domain>> = lock(&self.state.domains).values().cloned().collect();
        let mut total = ScanReport::default();
        for d in domains {
            total.add(&d.host.merge_now()?);
        }
        Ok(total)
    }

    /// What the service holds now, as the kernel counts it.
    pub fn stats(&self) -> Result<ServiceStats, ServiceError> {
        let domains: Vec<Arc<Domain>> = lock(&self.state.domains).values().cloned().collect();
        let mut s = ServiceStats {
            vms: lock(&self.state.vms).len(),
            domains: domains.len(),
            ..ServiceStats::default()
        };
        for d in &domains {
            s.shared_bytes += d.host.frame_store().allocated_bytes()?;
        }
        let vms: Vec<(Arc<Domain>, VmId)> = lock(&self.state.vms)
            .values()
            .map(|v| (Arc::clone(&v.domain), v.id))
            .collect();
        for (d, id) in vms {
            if let Ok(mem) = d.host.memory(id) {
                s.guest_bytes += mem.frame_store().allocated_bytes()?;
            }
            if let Ok(st) = d.host.vm_stats(id) {
                s.pages_merged += st.pages_merged + st.zero_pages;
            }
        }
        Ok(s)
    }

    /// The process ids of the attached VMs, by the VM id the service gave.
    pub fn clients(&self) -> Vec<(u64, i32)> {
        let mut v: Vec<(u64, i32)> = lock(&self.state.vms)
            .iter()
            .map(|(id, r)| (*id, r.peer.pid))
            .collect();
        v.sort_unstable();
        v
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // Every process sees its connection close: it releases what the
        // service armed and goes on; the service forgets its VM.
        for (_, c) in lock(&self.state.conns).drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(state: &Arc<State>, listener: &UnixListener) {
    for stream in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            lock(&state.conns).insert(id, c);
        }
        let state = Arc::clone(state);
        // A connection whose thread cannot be made is dropped (closed): the
        // process sees the refusal as a closed socket.
        let _ = std::thread::Builder::new()
            .name("pagefold-client".into())
            .spawn(move || serve_connection(&state, stream, id));
    }
}

/// What a connection is, once admitted.
enum Peer {
    /// The VMM of VM `vm`.
    Vmm { vm: u64 },
    /// A second mapper of VM `vm`.
    Second { vm: u64, mapper: Arc<ConnMapper> },
}

impl Peer {
    fn vm(&self) -> u64 {
        match self {
            Peer::Vmm { vm } | Peer::Second { vm, .. } => *vm,
        }
    }

    fn mapper(&self, state: &State) -> Option<Arc<ConnMapper>> {
        match self {
            Peer::Second { mapper, .. } => Some(Arc::clone(mapper)),
            Peer::Vmm { vm } => lock(&state.vms)
                .get(vm)
                .map(|r| Arc::clone(r.mappers.primary())),
        }
    }
}

/// One VMM process (or second mapper), from its hello to its end.
fn serve_connection(state: &Arc<State>, stream: UnixStream, id: u64) {
    let mut conn = Conn::new(stream);
    serve(state, &mut conn);
    // The service keeps a clone of every stream (to close them all when it
    // stops): shut this one down, so the process sees it end now, and let
    // the clone go (found by review: both kept refused peers open).
    let _ = conn.stream().shutdown(std::net::Shutdown::Both);
    lock(&state.conns).remove(&id);
}

fn serve(state: &Arc<State>, conn: &mut Conn) {
    let (peer, acks) = match admit(state, conn) {
        Ok(v) => v,
        Err(e) => {
            let _ = conn.send(
                &Message::Error(ErrorMsg::new(e.code(), &e.to_string())),
                &[],
            );
            return;
        }
    };
    let _ = conn.set_read_timeout(None);
    let answered = peer.mapper(state);
    let mut leaving = false;
    // Breaking asks every mapper (this one too) to remap and waits for
    // acks, which this thread reads: breaks run on a thread beside, made on
    // the first one.
    let mut breaks: Option<mpsc::Sender<super::wire::Break>> = None;
    loop {
        match conn.recv() {
            Ok(Some((Message::Ack(ack), _))) => {
                if let Some(m) = &answered {
                    m.answered();
                }
                let _ = acks.send(ack);
            }
            Ok(Some((Message::Break(b), _))) => {
                if breaks.is_none() {
                    breaks = break_worker(state, &peer);
                }
                if let Some(tx) = &breaks {
                    let _ = tx.send(b);
                }
            }
            Ok(Some((Message::Bye, _))) if !leaving => {
                // Unmerging asks the process to restore its pages and waits
                // for its acks, which this thread reads: do it beside.
                leaving = true;
                let state = Arc::clone(state);
                let reply = conn.try_clone();
                let who = match &peer {
                    Peer::Vmm { vm } => Ok(*vm),
                    Peer::Second { vm, mapper } => Err((*vm, Arc::clone(mapper))),
                };
                let _ = std::thread::Builder::new()
                    .name("pagefold-detach".into())
                    .spawn(move || {
                        let done = match who {
                            Ok(vm) => detach(&state, vm),
                            Err((vm, mapper)) => second_leaves(&state, vm, &mapper),
                        };
                        if let Ok(reply) = reply {
                            // Goodbye only when every page came home (found by
                            // review: a failed detach said goodbye, the process
                            // unprotected its pages, and a later unmerge wrote
                            // shared frames over its writes).
                            let msg = if done {
                                Message::Bye
                            } else {
                                Message::Error(ErrorMsg::new(
                                    4,
                                    "the service could not bring every page home; bring them home yourself",
                                ))
                            };
                            let _ = reply.send(&msg, &[]);
                        }
                    });
            }
            // A second goodbye changes nothing.
            Ok(Some((Message::Bye, _))) => {}
            Ok(Some((other, _))) => {
                let e = ServiceError::Unexpected {
                    expected: "Ack, Break or Bye",
                    got: other.kind_name(),
                };
                let _ = conn.send(
                    &Message::Error(ErrorMsg::new(e.code(), &e.to_string())),
                    &[],
                );
                break;
            }
            Ok(None) => break,
            Err(e) => {
                let _ = conn.send(&Message::Error(ErrorMsg::new(1, &e.to_string())), &[]);
                break;
            }
        }
    }
    drop(acks);
    drop(breaks);
    match peer {
        Peer::Vmm { vm } => lose(state, vm),
        Peer::Second { vm, mapper } => {
            // A backend whose connection ended may live on writing its
            // pages, where no other process sees them: the VM leaves the
            // service (found by review). One that said goodbye is gone
            // from the VM's set already.
            if !mapper.is_lost() {
                lose(state, vm);
            }
        }
    }
}

/// The thread that breaks what one connection's writers wait on, in the
/// order they asked; it ends when the connection's sender is dropped.
fn break_worker(state: &Arc<State>, peer: &Peer) -> Option<mpsc::Sender<super::wire::Break>> {
    let (tx, rx) = mpsc::channel::<super::wire::Break>();
    let (state, vm, from) = (Arc::clone(state), peer.vm(), peer.mapper(state)?);
    std::thread::Builder::new()
        .name("pagefold-break".into())
        .spawn(move || {
            for b in rx {
                break_sharing(&state, vm, b, &from);
            }
        })
        .ok()?;
    Some(tx)
}

/// Breaks the sharing of a merged page a writer of `from` waits on: the
/// page's bytes go to its own frame, every mapper maps it there, and the
/// release wakes the writer. A page that is not merged (the fault raced
/// a break, or `from` kept a protection it should not have) is unprotected
/// in `from`, held so that no merge window is protecting it meanwhile.
fn break_sharing(state: &State, vm: u64, b: super::wire::Break, from: &ConnMapper) {
    let Some((domain, id)) = lock(&state.vms)
        .get(&vm)
        .map(|r| (Arc::clone(&r.domain), r.id))
    else {
        return;
    };
    let (Ok(region), Ok(page)) = (usize::try_from(b.region), usize::try_from(b.page)) else {
        return;
    };
    let Ok(mem) = domain.host.memory(id) else {
        return;
    };
    let Some(gpa) = mem.regions().get(region).and_then(|r| {
        (page < r.pages()).then(|| {
            crate::addr::GuestPhysAddr(r.start().0 + (page * crate::addr::PAGE_SIZE) as u64)
        })
    }) else {
        return;
    };
    if let Ok(true) = domain.host.resolve_write_fault(id, gpa) {
        return;
    }
    let lifted = domain
        .host
        .with_private_page_held(id, region, page, || {
            from.release(region, &[(page, 1)], (page, 1));
        })
        .unwrap_or(false);
    if !lifted {
        // Held by a merge or unmerge now: its release wakes the writer; a
        // wake now only makes it ask again.
        std::thread::sleep(Duration::from_micros(200));
        from.release(region, &[], (page, 1));
    }
}

/// Unmerges a VM whose VMM asked to leave, and lets it go. Where that
/// fails (the process did not bring its pages home), the VM stays, taking
/// no merges, until its connection ends ([`lose`]): its shared frames are
/// not freed under a process that still maps them (found by review: a slow
/// restore on detach freed them, and the process read zeros).
fn detach(state: &State, vm: u64) -> bool {
    let Some((domain, id, mappers)) = lock(&state.vms)
        .get(&vm)
        .map(|r| (Arc::clone(&r.domain), r.id, Arc::clone(&r.mappers)))
    else {
        return false;
    };
    mappers.quarantine();
    if domain.host.unregister(id).is_err() {
        return false;
    }
    lock(&state.vms).remove(&vm);
    // Its backends are home too, and follow no VM now: they are hung up on
    // (found by review: one kept mapping frames a new VM on the same memfd
    // punched).
    for b in mappers.others() {
        b.mark_lost();
        b.hang_up();
    }
    drop_domain_if_empty(state, &domain);
    true
}

/// A second mapper says goodbye: every page of its VM comes home first
/// (through every mapper, this one too), so it leaves mapping the truth,
/// then windows leave it out. The VM merges again without it.
fn second_leaves(state: &State, vm: u64, mapper: &Arc<ConnMapper>) -> bool {
    let Some((domain, id, mappers)) = lock(&state.vms)
        .get(&vm)
        .map(|r| (Arc::clone(&r.domain), r.id, Arc::clone(&r.mappers)))
    else {
        return false;
    };
    if domain.host.unmerge_vm(id).is_err() {
        return false;
    }
    mapper.mark_lost();
    mappers.remove(mapper);
    true
}

/// A VM that leaves the service without a goodbye: its VMM's connection
/// ended, or a backend's did. Every process that maps it is hung up on and
/// brings its merged pages home itself (as when the service dies: only
/// holes of the memfd are filled, under per-page locks); the service writes
/// nothing of the VM's memfd any more (found by review: an unmerge here
/// wrote shared frames over the writes of a VMM that had brought itself
/// home). The VM is forgotten, and the frames only it used freed, once
/// every such process has exited (a process that only closed its socket
/// lives on with its pages mapped).
fn lose(state: &Arc<State>, vm: u64) {
    let Some(rec) = lock(&state.vms).remove(&vm) else {
        return;
    };
    rec.mappers.quarantine();
    let mut holders = vec![Arc::clone(rec.mappers.primary())];
    holders.extend(rec.mappers.others());
    for h in &holders {
        h.mark_lost();
        h.hang_up();
    }
    if state.stop.load(Ordering::SeqCst) {
        // The service stops: nothing is freed, the shared memfd lives on in
        // the processes that map it.
        return;
    }
    let (state, domain, id) = (Arc::clone(state), Arc::clone(&rec.domain), rec.id);
    let forget = move || {
        let _ = domain.host.forget(id);
        drop_domain_if_empty(&state, &domain);
    };
    if holders.iter().all(|h| h.exited(0) == Some(true)) {
        forget();
        return;
    }
    // Waits for every process that may map the frames to exit.
    let _ = std::thread::Builder::new()
        .name("pagefold-reaper".into())
        .spawn(move || {
            while !holders.iter().all(|h| h.exited(1000) == Some(true)) {}
            forget();
        });
}

/// Drops `domain` if no VM is left in it (its dedup host, background
/// scanner and shared memfd go with it).
fn drop_domain_if_empty(state: &State, domain: &Arc<Domain>) {
    let mut domains = lock(&state.domains);
    let in_use = lock(&state.vms)
        .values()
        .any(|r| Arc::ptr_eq(&r.domain, domain))
        || domain.host.vm_count() > 0;
    if !in_use {
        domains.retain(|_, d| !Arc::ptr_eq(d, domain));
    }
}

type AckSender = mpsc::Sender<super::wire::Ack>;

/// Reads the hello, checks the process and its memory, registers the VM
/// (or adds the second mapper to its VM) and welcomes it.
fn admit(state: &Arc<State>, conn: &mut Conn) -> Result<(Peer, AckSender), ServiceError> {
    let peer = conn.peer_cred()?;
    if peer.uid != state.uid && peer.uid != 0 && !state.options.allowed_uids.contains(&peer.uid) {
        return Err(ServiceError::NotAllowed {
            pid: peer.pid,
            uid: peer.uid,
        });
    }
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (hello, mut fds) = match conn.recv()? {
        Some((Message::Hello(h), fds)) => (h, fds),
        Some((other, _)) => {
            return Err(ServiceError::Unexpected {
                expected: "Hello",
                got: other.kind_name(),
            })
        }
        None => return Err(ServiceError::Closed),
    };
    // The socket layer checked the count: memfd, userfaultfd, control.
    let (Some(control_fd), Some(uffd_fd), Some(memfd)) = (fds.pop(), fds.pop(), fds.pop()) else {
        return Err(ServiceError::BadMemory {
            what: "Hello came without its three descriptors".into(),
        });
    };
    let control = ControlPage::adopt(control_fd.as_fd()).map_err(|source| ServiceError::Os {
        op: "map the control page",
        source,
    })?;
    let (tx, rx) = mpsc::channel();
    let regions: Vec<ClientRegion> = hello
        .regions
        .iter()
        .map(|d| ClientRegion {
            host_addr: d.host_addr,
            pages: usize::try_from(d.size / crate::addr::PAGE_SIZE as u64).unwrap_or(0),
        })
        .collect();
    // A process that stops reading cannot block a sender past this: the
    // send fails and the process is given up on (found by review: remaps
    // piled up in a stopped process's socket until a send blocked the
    // domain for good).
    let sender = conn.try_clone()?;
    sender.set_write_timeout(Some(state.options.ack_deadline.max(Duration::from_secs(1))))?;
    let mapper = Arc::new(ConnMapper::new(
        sender,
        rx,
        Userfault::from_fd(uffd_fd),
        control,
        regions,
        state.options.ack_deadline,
        peer.pid,
    ));
    if hello.second_mapper {
        return admit_second(state, conn, &hello, &memfd, peer, mapper).map(|p| (p, tx));
    }
    if lock(&state.vms).len() >= state.options.max_vms {
        return Err(ServiceError::BadMemory {
            what: format!(
                "the service holds its maximum of {} VMs",
                state.options.max_vms
            ),
        });
    }
    let inode = file_id(&memfd)?;
    if lock(&state.vms).values().any(|r| r.inode == inode) {
        // Two VMs of the engine on the same frames would merge each other's
        // pages away (found by review).
        return Err(ServiceError::BadMemory {
            what: "this memfd is under the service already (a second mapper attaches with attach_second_mapper)".into(),
        });
    }
    let mem = adopt_memory(state, &hello, memfd)?;
    // The domains' lock is held until the VM is recorded, so an emptied
    // domain is not dropped under a VM joining it.
    let mut domains = lock(&state.domains);
    let domain = domain_for(state, &mut domains, peer.uid, hello.domain)?;
    let mappers = Arc::new(VmMappers::new(Arc::clone(&mapper), hello.break_on_write));
    let id = domain.host.register_remote(
        Arc::new(mem),
        VmOptions {
            domain: DomainId(0),
            exclude: hello
                .regions
                .iter()
                .enumerate()
                .filter(|(i, _)| hello.exclude_regions >> i & 1 == 1)
                .map(|(_, r)| r.gpa)
                .collect(),
        },
        Arc::clone(&mappers) as Arc<dyn crate::dedup::remote::RemoteMapper>,
    )?;
    let vm = state.next_vm.fetch_add(1, Ordering::Relaxed);
    // Recorded before the welcome: a second mapper may come as soon as the
    // VMM hears it.
    lock(&state.vms).insert(
        vm,
        VmRecord {
            domain: Arc::clone(&domain),
            id,
            mappers,
            peer,
            inode,
            regions: hello.regions.clone(),
        },
    );
    drop(domains);
    if let Err(e) = conn.send(
        &Message::Welcome(Welcome { vm_id: vm }),
        &[domain.shared_read_only.as_fd()],
    ) {
        lose(state, vm);
        return Err(e.into());
    }
    Ok((Peer::Vmm { vm }, tx))
}

/// A second mapper of a VM: found by its memfd among the VMs of its user,
/// added to the VM's mappers, told every merged run, then welcomed.
fn admit_second(
    state: &State,
    conn: &Conn,
    hello: &Hello,
    memfd: &OwnedFd,
    peer: PeerCred,
    mapper: Arc<ConnMapper>,
) -> Result<Peer, ServiceError> {
    let inode = file_id(memfd)?;
    let (vm, domain, id, mappers) = {
        let vms = lock(&state.vms);
        let Some((vm, rec)) = vms.iter().find(|(_, r)| r.inode == inode) else {
            return Err(ServiceError::BadMemory {
                what: "no VM under the service has this memfd".into(),
            });
        };
        if rec.peer.uid != peer.uid && peer.uid != 0 {
            return Err(ServiceError::NotAllowed {
                pid: peer.pid,
                uid: peer.uid,
            });
        }
        if !rec.mappers.break_on_write() {
            return Err(ServiceError::BadMemory {
                what: "the VM was attached without break_on_write, so its merged pages may be copies only its VMM sees; a second mapper needs it".into(),
            });
        }
        let same =
            rec.regions.len() == hello.regions.len()
                && rec.regions.iter().zip(&hello.regions).all(|(a, b)| {
                    a.gpa == b.gpa && a.size == b.size && a.file_offset == b.file_offset
                });
        if !same {
            return Err(ServiceError::BadMemory {
                what: "the second mapper's regions differ from the VM's (gpa, size, file offset)"
                    .into(),
            });
        }
        (
            *vm,
            Arc::clone(&rec.domain),
            rec.id,
            Arc::clone(&rec.mappers),
        )
    };
    mappers.add(Arc::clone(&mapper));
    // Welcomed first (it needs the shared memfd to follow the remaps),
    // then told every merged run, then ready. Its acks come through the
    // connection's reader, which starts when this returns: the catch-up
    // runs beside it.
    if let Err(e) = conn.send(
        &Message::Welcome(Welcome { vm_id: vm }),
        &[domain.shared_read_only.as_fd()],
    ) {
        mappers.remove(&mapper);
        return Err(e.into());
    }
    let (m, notify) = (Arc::clone(&mapper), conn.try_clone()?);
    // A window in flight is waited for: its processes answer, or it is
    // rolled back, within two deadlines.
    let wait = state.options.ack_deadline.saturating_mul(2) + Duration::from_secs(10);
    let caught_up = std::thread::Builder::new()
        .name("pagefold-catch-up".into())
        .spawn(move || {
            let told = domain
                .host
                .catch_up(id, wait, |region, runs| m.remap(region, runs));
            match told {
                Ok(()) => {
                    let _ = notify.send(&Message::Ready, &[]);
                }
                Err(e) => {
                    mappers.remove(&m);
                    m.mark_lost();
                    let _ = notify.send(&Message::Error(ErrorMsg::new(4, &e.to_string())), &[]);
                    let _ = notify.stream().shutdown(std::net::Shutdown::Both);
                }
            }
        });
    if caught_up.is_err() {
        mapper.mark_lost();
        return Err(ServiceError::Os {
            op: "spawn the catch-up thread",
            source: std::io::Error::from_raw_os_error(libc::EAGAIN),
        });
    }
    Ok(Peer::Second { vm, mapper })
}

/// The device and inode of a descriptor's file: how a second mapper's
/// memfd is matched to its VM.
fn file_id(fd: &OwnedFd) -> Result<(u64, u64), ServiceError> {
    let st = memfd::fstat(fd.as_fd()).map_err(|source| ServiceError::Os {
        op: "fstat the guest memfd",
        source,
    })?;
    Ok((st.st_dev, st.st_ino))
}

/// Builds the service's view of a process's guest memory over its memfd:
/// the same layout allocated the same way, so every region's frames must
/// sit at the offset the process said.
fn adopt_memory(state: &State, hello: &Hello, memfd: OwnedFd) -> Result<GuestMemory, ServiceError> {
    let total = hello
        .regions
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(r.size))
        .filter(|t| *t <= state.options.max_guest_bytes)
        .ok_or_else(|| ServiceError::BadMemory {
            what: format!(
                "the regions add up to more than the service's limit of {} bytes",
                state.options.max_guest_bytes
            ),
        })?;
    let _ = total;
    let store = Arc::new(FrameStore::adopt(memfd, &format!("vm-{}", hello.vm_tag))?);
    let layout: Vec<_> = hello.regions.iter().map(|r| (r.gpa, r.size)).collect();
    let mem = GuestMemory::with_store(store, &layout)?;
    for (i, (r, want)) in mem.regions().iter().zip(&hello.regions).enumerate() {
        if r.frames().start.file_offset() != want.file_offset {
            return Err(ServiceError::BadMemory {
                what: format!(
                    "region {i}: its frames are at memfd offset {:#x}, the process said {:#x} (memory must be alone in its memfd, regions allocated in address order)",
                    r.frames().start.file_offset(),
                    want.file_offset
                ),
            });
        }
    }
    Ok(mem)
}

/// The domain of user `uid` numbered `number`, made on first use.
fn domain_for(
    state: &State,
    domains: &mut HashMap<(u32, u64), Arc<Domain>>,
    uid: u32,
    number: u64,
) -> Result<Arc<Domain>, ServiceError> {
    if let Some(d) = domains.get(&(uid, number)) {
        return Ok(Arc::clone(d));
    }
    let store = FrameStore::new(StoreOptions {
        name: format!("pagefold-domain-{uid}-{number}"),
        ..StoreOptions::default()
    })?;
    let shared_read_only = reopen_read_only(&store)?;
    let host = DedupHost::with_options(Arc::new(store), state.options.dedup.clone())?;
    if let Some((budget, interval)) = state.options.background {
        host.start_background(budget, interval)?;
    }
    let d = Arc::new(Domain {
        host,
        shared_read_only,
    });
    domains.insert((uid, number), Arc::clone(&d));
    Ok(d)
}

/// A read-only descriptor of `store`'s memfd (a new open file description
/// through `/proc/self/fd`): a process holding it can map the frames
/// private or read-only, and can neither write them nor change the file's
/// size or holes.
fn reopen_read_only(store: &FrameStore) -> Result<OwnedFd, ServiceError> {
    memfd::reopen(store.as_fd(), false).map_err(|source| ServiceError::Os {
        op: "reopen the shared memfd read-only",
        source,
    })
}
