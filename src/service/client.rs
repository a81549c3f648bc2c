//! The VMM process's side of the host service: [`ServiceClient`] puts a
//! [`GuestMemory`] under the service and runs the thread that applies the
//! service's remaps to this process's address space, acknowledging each
//! before the service punches a frame this process mapped.
//!
//! A merged page here is a private copy-on-write view of the domain's
//! shared memfd (read-only descriptor), so a vCPU's write is the kernel's
//! own copy on write, as in one process. Should the service die, the
//! thread releases any write protection the service left armed and the
//! memory goes on as it is: merged pages readable, writes copied.

use std::{
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use super::{
    control::{ControlPage, Window},
    error::ServiceError,
    socket::Conn,
    wire::{Ack, AckStatus, Hello, Message, PageRun, RegionDesc, RemapRun, RemapTo},
};
use crate::{
    addr::{HostVirtAddr, PAGE_SIZE},
    memory::GuestMemory,
    userfault::Userfault,
};

/// How a process joins the service.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientOptions {
    /// Its merge domain, among the domains of its user: only VMs of the
    /// same user and domain number share frames.
    pub domain: u64,
    /// A label the service keeps with the VM (logs, memfd names).
    pub vm_tag: u64,
}

/// One region as this process maps it.
#[derive(Clone, Copy, Debug)]
struct Region {
    host_addr: HostVirtAddr,
    pages: usize,
    /// Byte offset of its first frame in the guest memfd.
    own_offset: u64,
}

/// What the remap thread and the client share.
struct Shared {
    mem: Arc<GuestMemory>,
    uffd: Userfault,
    control: ControlPage,
    regions: Vec<Region>,
    /// The domain's shared frames, read-only.
    shared_fd: OwnedFd,
    /// Per region, which pages map something other than their own frame.
    remapped: Mutex<Vec<Vec<bool>>>,
    connected: AtomicBool,
}

/// A VMM process's guest memory under the host service.
pub struct ServiceClient {
    shared: Arc<Shared>,
    vm_id: u64,
    sender: Conn,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("vm_id", &self.vm_id)
            .field("connected", &self.connected())
            .finish()
    }
}

fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> ServiceError {
    move |source| ServiceError::Os { op, source }
}

impl ServiceClient {
    /// Puts `mem` under the service listening at `socket`. The memory must
    /// be alone in its frame store (made by [`GuestMemory::new`]), since
    /// the service receives the whole memfd, and must not be registered
    /// with a dedup host of this process.
    pub fn attach(
        socket: &Path,
        mem: Arc<GuestMemory>,
        options: ClientOptions,
    ) -> Result<ServiceClient, ServiceError> {
        let store = mem.frame_store();
        let frames: u64 = mem.regions().iter().map(|r| r.frames().count).sum();
        if store.allocated_frames() != frames {
            return Err(ServiceError::BadMemory {
                what: "the guest memory shares its frame store with other memory; the service would receive all of it".into(),
            });
        }
        if !mem.claim_for_dedup() {
            return Err(ServiceError::BadMemory {
                what: "the guest memory is registered with a dedup host already".into(),
            });
        }
        match Self::connect(socket, &mem, options) {
            Ok(c) => Ok(c),
            Err(e) => {
                mem.release_from_dedup();
                Err(e)
            }
        }
    }

    fn connect(
        socket: &Path,
        mem: &Arc<GuestMemory>,
        options: ClientOptions,
    ) -> Result<ServiceClient, ServiceError> {
        let store = mem.frame_store();
        store.forbid_shrinking()?;
        let uffd = Userfault::new()?;
        let regions: Vec<Region> = mem
            .regions()
            .iter()
            .map(|r| Region {
                host_addr: r.host_addr(),
                pages: r.pages(),
                own_offset: r.frames().start.file_offset(),
            })
            .collect();
        // Registered now, so the service can arm protection anywhere; every
        // remap below registers its fresh mapping again.
        for r in &regions {
            uffd.register(r.host_addr, (r.pages * PAGE_SIZE) as u64)?;
        }
        let (control, control_fd) = ControlPage::create().map_err(os("create the control page"))?;
        let stream = UnixStream::connect(socket).map_err(os("connect to the service"))?;
        let mut conn = Conn::new(stream);
        let hello = Message::Hello(Hello {
            second_mapper: false,
            domain: options.domain,
            vm_tag: options.vm_tag,
            regions: mem
                .regions()
                .iter()
                .map(|r| RegionDesc {
                    gpa: r.start(),
                    size: r.size(),
                    host_addr: r.host_addr(),
                    file_offset: r.frames().start.file_offset(),
                })
                .collect(),
        });
        conn.send(&hello, &[store.as_fd(), uffd_fd(&uffd), control_fd.as_fd()])?;
        drop(control_fd);
        let (welcome, shared_fd) = match conn.recv()? {
            Some((Message::Welcome(w), mut fds)) => match fds.pop() {
                Some(fd) => (w, fd),
                None => {
                    return Err(ServiceError::Unexpected {
                        expected: "Welcome with the shared memfd",
                        got: "Welcome without it",
                    })
                }
            },
            Some((Message::Error(e), _)) => {
                return Err(ServiceError::Refused {
                    code: e.code,
                    text: e.text,
                })
            }
            Some((other, _)) => {
                return Err(ServiceError::Unexpected {
                    expected: "Welcome",
                    got: other.kind_name(),
                })
            }
            None => return Err(ServiceError::Closed),
        };
        let shared = Arc::new(Shared {
            mem: Arc::clone(mem),
            uffd,
            control,
            remapped: Mutex::new(regions.iter().map(|r| vec![false; r.pages]).collect()),
            regions,
            shared_fd,
            connected: AtomicBool::new(true),
        });
        let sender = conn.try_clone()?;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pagefold-remap".into())
            .spawn(move || remap_loop(&thread_shared, conn))
            .map_err(os("spawn the remap thread"))?;
        Ok(ServiceClient {
            shared,
            vm_id: welcome.vm_id,
            sender,
            thread: Some(thread),
        })
    }

    /// The id the service gave this VM.
    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.mem
    }

    /// The read-only descriptor of this VM's merge domain's shared frames
    /// that merged pages map (private).
    pub fn shared_frames_fd(&self) -> BorrowedFd<'_> {
        self.shared.shared_fd.as_fd()
    }

    /// Whether the service is still there.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Pages of this process mapping a shared frame or zeros now.
    pub fn pages_remapped(&self) -> u64 {
        lock(&self.shared.remapped)
            .iter()
            .map(|r| r.iter().filter(|m| **m).count() as u64)
            .sum()
    }

    /// Leaves the service: it restores every merged page into this
    /// process's own memfd (through the remap thread) and says goodbye.
    /// Without a service (it died), every merged page is restored here.
    pub fn detach(mut self) -> Result<Arc<GuestMemory>, ServiceError> {
        if self.connected() && self.sender.send(&Message::Bye, &[]).is_ok() {
            self.join();
        } else {
            self.shutdown();
        }
        let restored = restore_all_here(&self.shared);
        self.shared.mem.release_from_dedup();
        restored.map(|()| Arc::clone(&self.shared.mem))
    }

    /// After the service was lost: restores every merged page into this
    /// process's own memfd (so a new service reads true bytes there) and
    /// attaches to the service at `socket` again.
    pub fn reattach(
        self,
        socket: &Path,
        options: ClientOptions,
    ) -> Result<ServiceClient, ServiceError> {
        let mem = self.detach()?;
        ServiceClient::attach(socket, mem, options)
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn shutdown(&mut self) {
        let _ = self.sender.stream().shutdown(std::net::Shutdown::Both);
        self.join();
    }
}

impl Drop for ServiceClient {
    fn drop(&mut self) {
        // The service forgets the VM when the socket closes; merged pages
        // stay mapped here, readable, copied on write.
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The bitmaps are consistent between statements.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn uffd_fd(uffd: &Userfault) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is owned by `uffd`, which outlives the
    // borrow (it is only used while `uffd` is).
    unsafe { BorrowedFd::borrow_raw(uffd.as_raw_fd()) }
}

/// Serves the service's requests until it says goodbye or goes away.
fn remap_loop(shared: &Shared, mut conn: Conn) {
    loop {
        let reply = match conn.recv() {
            Ok(Some((Message::Remap(m), _))) => {
                let status = if shared.control.advance(m.seq, Window::Armed, Window::Taken) {
                    let r = remap(shared, m.region, &m.runs);
                    shared.control.advance(m.seq, Window::Taken, Window::Done);
                    r
                } else {
                    Ok(AckStatus::Skipped)
                };
                ack(m.seq, status)
            }
            Ok(Some((Message::Restore(m), _))) => ack(
                m.seq,
                restore(shared, m.region, &m.runs).map(|()| AckStatus::Done),
            ),
            Ok(Some((Message::Bye, _))) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => break,
        };
        if conn.send(&Message::Ack(reply), &[]).is_err() {
            break;
        }
    }
    shared.connected.store(false, Ordering::SeqCst);
    release_everything(shared);
}

fn ack(seq: u64, r: Result<AckStatus, i32>) -> Ack {
    match r {
        Ok(status) => Ack {
            seq,
            status,
            errno: 0,
        },
        Err(errno) => Ack {
            seq,
            status: AckStatus::Failed,
            errno: errno.unsigned_abs(),
        },
    }
}

/// With no service left to release them, disarms every write protection
/// in this process's guest memory and wakes whoever waits.
fn release_everything(shared: &Shared) {
    for r in &shared.regions {
        let len = (r.pages * PAGE_SIZE) as u64;
        let _ = shared.uffd.unprotect(r.host_addr, len, true);
        let _ = shared.uffd.wake(r.host_addr, len);
    }
}

/// The host address and length of `pages` from `first` in `region`, if
/// they lie inside it: nothing the service says can make this process map
/// over anything but its own guest memory.
fn span(shared: &Shared, region: usize, first: u64, pages: u64) -> Option<(HostVirtAddr, usize)> {
    let r = shared.regions.get(region)?;
    let first = usize::try_from(first).ok()?;
    let pages = usize::try_from(pages).ok()?;
    if pages == 0 || first.checked_add(pages)? > r.pages {
        return None;
    }
    Some((
        HostVirtAddr(r.host_addr.0 + (first * PAGE_SIZE) as u64),
        pages * PAGE_SIZE,
    ))
}

/// `mmap(MAP_FIXED)` of `len` bytes at `addr`, then registers the fresh
/// mapping for write protection so the service can arm it later.
fn map_fixed(
    shared: &Shared,
    addr: HostVirtAddr,
    len: usize,
    flags: libc::c_int,
    fd: RawFd,
    offset: u64,
) -> Result<(), i32> {
    let offset = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
    // `addr..addr+len` lies inside one region of this process's guest
    // memory (checked by `span`), which its `HostMapping` owns; MAP_FIXED
    // replaces only those pages, and no Rust reference into them exists.
    // SAFETY: as argued above; `fd` is a live descriptor or -1.
    let p = unsafe {
        libc::mmap(
            addr.0 as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd,
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    shared
        .uffd
        .register(addr, len as u64)
        .map_err(|_| libc::EIO)
}

/// Applies a remap: each run onto the shared frames or zeros.
fn remap(shared: &Shared, region: u32, runs: &[RemapRun]) -> Result<AckStatus, i32> {
    let region = region as usize;
    for run in runs {
        let (addr, len) = span(shared, region, run.first_page, run.pages).ok_or(libc::EINVAL)?;
        match run.target {
            RemapTo::Shared { file_offset } => map_fixed(
                shared,
                addr,
                len,
                libc::MAP_PRIVATE,
                shared.shared_fd.as_raw_fd(),
                file_offset,
            )?,
            RemapTo::Zero => map_fixed(
                shared,
                addr,
                len,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )?,
        }
        mark(shared, region, run.first_page, run.pages, true);
    }
    Ok(AckStatus::Done)
}

fn mark(shared: &Shared, region: usize, first: u64, pages: u64, remapped: bool) {
    if let Some(r) = lock(&shared.remapped).get_mut(region) {
        let (Ok(first), Ok(pages)) = (usize::try_from(first), usize::try_from(pages)) else {
            return;
        };
        if let Some(s) = first
            .checked_add(pages)
            .and_then(|end| r.get_mut(first..end))
        {
            s.iter_mut().for_each(|m| *m = remapped);
        }
    }
}

/// Applies a restore: each page's current bytes (as this process maps
/// them, its copies included) into its own frame, then the run mapped
/// shared at its own frames again. The service holds the pages' writers
/// (write protection) meanwhile.
fn restore(shared: &Shared, region: u32, runs: &[PageRun]) -> Result<(), i32> {
    let region = region as usize;
    for run in runs {
        let (addr, len) = span(shared, region, run.first_page, run.pages).ok_or(libc::EINVAL)?;
        let own = shared.regions[region].own_offset + run.first_page * PAGE_SIZE as u64;
        copy_home(shared, addr, len, own)?;
        map_fixed(
            shared,
            addr,
            len,
            libc::MAP_SHARED,
            shared.mem.frame_store().as_raw_fd(),
            own,
        )?;
        mark(shared, region, run.first_page, run.pages, false);
    }
    Ok(())
}

/// Writes the bytes mapped at `addr..addr+len` into the guest memfd at
/// `own`, a page at a time; an all-zero page is punched instead.
fn copy_home(shared: &Shared, addr: HostVirtAddr, len: usize, own: u64) -> Result<(), i32> {
    let fd = shared.mem.frame_store().as_raw_fd();
    let mut page = [0u8; PAGE_SIZE];
    for k in 0..len / PAGE_SIZE {
        let at = usize::try_from(addr.0).map_err(|_| libc::EINVAL)? + k * PAGE_SIZE;
        // The page lies inside this process's guest memory (checked by the
        // caller), which stays mapped for the call; writers wait on write
        // protection, and the copy forms no reference into guest memory.
        // SAFETY: as argued above.
        unsafe { crate::memory::copy::copy_from_guest(at as *const u8, &mut page) };
        let off = libc::off_t::try_from(own + (k * PAGE_SIZE) as u64).map_err(|_| libc::EINVAL)?;
        let rc = if page.iter().all(|b| *b == 0) {
            // SAFETY: plain syscall on the guest memfd, which we own.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    PAGE_SIZE as libc::off_t,
                )
            }
        } else {
            // SAFETY: `page` is valid for PAGE_SIZE bytes of reads.
            let n = unsafe { libc::pwrite(fd, page.as_ptr().cast(), PAGE_SIZE, off) };
            if n == PAGE_SIZE as isize {
                0
            } else {
                -1
            }
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
    }
    Ok(())
}

/// With no service: brings every remapped page home, under this process's
/// own write protection, so the memfd holds the guest's bytes again.
fn restore_all_here(shared: &Shared) -> Result<(), ServiceError> {
    let runs: Vec<(u32, u64, u64)> = {
        let remapped = lock(&shared.remapped);
        let mut v = Vec::new();
        for (ri, r) in remapped.iter().enumerate() {
            let mut p = 0;
            while p < r.len() {
                if r[p] {
                    let s = p;
                    while p < r.len() && r[p] {
                        p += 1;
                    }
                    if let Ok(ri) = u32::try_from(ri) {
                        v.push((ri, s as u64, (p - s) as u64));
                    }
                } else {
                    p += 1;
                }
            }
        }
        v
    };
    for (region, first, pages) in runs {
        let Some((addr, len)) = span(shared, region as usize, first, pages) else {
            continue;
        };
        shared.uffd.protect(addr, len as u64)?;
        let r = restore(
            shared,
            region,
            &[PageRun {
                first_page: first,
                pages,
            }],
        );
        let _ = shared.uffd.unprotect(addr, len as u64, true);
        let _ = shared.uffd.wake(addr, len as u64);
        r.map_err(|errno| ServiceError::Os {
            op: "restore merged pages into the guest memfd",
            source: std::io::Error::from_raw_os_error(errno),
        })?;
    }
    Ok(())
}
