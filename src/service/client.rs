//! The VMM process's side of the host service: [`ServiceClient`] puts a
//! [`GuestMemory`] under the service (or, in a second mapper such as a
//! vhost-user backend, a mapping of a VM's memfd) and runs the thread that
//! applies the service's remaps to this process's address space (`remap`),
//! acknowledging each before the service punches a frame this process
//! mapped.
//!
//! By default a merged page here is a private copy-on-write view of the
//! domain's shared memfd (read-only descriptor), so a vCPU's write is the
//! kernel's own copy on write, as in one process. With
//! [`ClientOptions::break_on_write`] (memory shared with other processes)
//! merged pages stay write-protected, and a second thread reads the write
//! faults and asks the service to break the sharing into the page's own
//! frame, which every mapper maps again before the writer goes on.
//!
//! Should the service die, the remap thread releases every protection it
//! left armed; in break-on-write mode every process brings its merged pages
//! home first. Merged pages stay readable and writes land.

use std::{
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
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
    remap::{lock, AddressSpace, Region},
    socket::Conn,
    wire::{Ack, AckStatus, Break, Hello, Message, RegionDesc},
};
use crate::{
    addr::{GuestPhysAddr, HostVirtAddr, PAGE_SIZE},
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
    /// The VM's memory is (or will be) mapped by other processes too
    /// (vhost-user backends): merged pages stay write-protected, and a
    /// write breaks the sharing through the service into a frame every
    /// mapper maps. Costs a round trip to the service on the first write to
    /// each merged page instead of the kernel's copy. Required for
    /// [`ServiceClient::attach_second_mapper`].
    pub break_on_write: bool,
    /// Regions the service leaves unmerged (device memory, regions this
    /// process shares by other means): bit `i` for the memory's region `i`
    /// in address order, as [`VmOptions::exclude`](crate::VmOptions) names
    /// regions in one process.
    pub exclude_regions: u64,
}

/// A region of a VM's memory as a second mapper maps it.
#[derive(Clone, Copy, Debug)]
pub struct MappedRegion {
    /// Its first guest-physical address.
    pub gpa: GuestPhysAddr,
    /// Its size in bytes.
    pub size: u64,
    /// Where this process maps it (a `MAP_SHARED` mapping of the memfd).
    pub host_addr: HostVirtAddr,
    /// The byte offset of its first page in the memfd.
    pub file_offset: u64,
}

/// A process's view of a VM's memory under the host service.
pub struct ServiceClient {
    space: Arc<AddressSpace>,
    vm_id: u64,
    sender: Conn,
    remap_thread: Option<JoinHandle<()>>,
    fault_thread: Option<JoinHandle<()>>,
    stop_faults: Arc<AtomicBool>,
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
        // The service receives the memory's file and maps it.
        store.file("the host service")?;
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
        let regions: Vec<MappedRegion> = mem
            .regions()
            .iter()
            .map(|r| MappedRegion {
                gpa: r.start(),
                size: r.size(),
                host_addr: r.host_addr(),
                file_offset: r.frames().start.file_offset(),
            })
            .collect();
        let connected = store
            .forbid_shrinking()
            .map_err(ServiceError::from)
            .and_then(|()| {
                Self::connect(
                    socket,
                    store.as_fd(),
                    &regions,
                    options,
                    false,
                    Some(Arc::clone(&mem)),
                )
            });
        if connected.is_err() {
            mem.release_from_dedup();
        }
        connected
    }

    /// Puts this process's mapping of a VM's memory under the service as a
    /// second mapper (a vhost-user backend): it follows every merge, and a
    /// write from here is seen by the VM and never lost. The VMM must have
    /// attached the VM with [`ClientOptions::break_on_write`]; the service
    /// finds the VM by the memfd. Attach before touching the memory: until
    /// this returns, merged pages read as holes here.
    ///
    /// # Safety
    ///
    /// Each region's `host_addr..host_addr + size` must be a live
    /// `MAP_SHARED` mapping of `memfd` at `file_offset` made by this
    /// process, that nothing else in it unmaps or remaps while the client
    /// lives: the client remaps pages inside it.
    pub unsafe fn attach_second_mapper(
        socket: &Path,
        memfd: BorrowedFd<'_>,
        regions: &[MappedRegion],
    ) -> Result<ServiceClient, ServiceError> {
        let options = ClientOptions {
            break_on_write: true,
            ..ClientOptions::default()
        };
        Self::connect(socket, memfd, regions, options, true, None)
    }

    fn connect(
        socket: &Path,
        memfd: BorrowedFd<'_>,
        mapped: &[MappedRegion],
        options: ClientOptions,
        second_mapper: bool,
        mem: Option<Arc<GuestMemory>>,
    ) -> Result<ServiceClient, ServiceError> {
        let uffd = if options.break_on_write {
            Userfault::new_with_remap_events()?
        } else {
            Userfault::new()?
        };
        let page = PAGE_SIZE as u64;
        let mut regions = Vec::with_capacity(mapped.len());
        for r in mapped {
            if r.size == 0 || r.size % page != 0 || r.host_addr.0 % page != 0 {
                return Err(ServiceError::BadMemory {
                    what: format!("region at {:#x}: size or address not page-aligned", r.gpa.0),
                });
            }
            let pages = usize::try_from(r.size / page).map_err(|_| ServiceError::BadMemory {
                what: "region too large".into(),
            })?;
            regions.push(Region {
                host_addr: r.host_addr,
                pages,
                own_offset: r.file_offset,
            });
        }
        // Registered now, so the service can arm protection anywhere; every
        // remap registers its fresh mapping again.
        for r in &regions {
            uffd.register(r.host_addr, (r.pages * PAGE_SIZE) as u64)?;
        }
        let (control, control_fd) = ControlPage::create().map_err(os("create the control page"))?;
        let stream = UnixStream::connect(socket).map_err(os("connect to the service"))?;
        let mut conn = Conn::new(stream);
        let hello = Message::Hello(Hello {
            second_mapper,
            break_on_write: options.break_on_write,
            exclude_regions: options.exclude_regions,
            domain: options.domain,
            vm_tag: options.vm_tag,
            regions: mapped
                .iter()
                .map(|r| RegionDesc {
                    gpa: r.gpa,
                    size: r.size,
                    host_addr: r.host_addr,
                    file_offset: r.file_offset,
                })
                .collect(),
        });
        // SAFETY: the descriptor is owned by `uffd`, which outlives the call.
        let uffd_fd = unsafe { BorrowedFd::borrow_raw(uffd.as_raw_fd()) };
        conn.send(&hello, &[memfd, uffd_fd, control_fd.as_fd()])?;
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
        let space = Arc::new(AddressSpace {
            mem,
            memfd: crate::frames::memfd::reopen(memfd, true)
                .map_err(os("reopen the guest memfd"))?,
            uffd,
            control,
            remapped: Mutex::new(regions.iter().map(|r| vec![false; r.pages]).collect()),
            regions,
            shared_fd,
            connected: AtomicBool::new(true),
            break_on_write: options.break_on_write,
        });
        let sender = conn.try_clone()?;
        let stop_faults = Arc::new(AtomicBool::new(false));
        // The fault thread first: in break-on-write mode every remap waits
        // for it to read the move's event.
        let fault_thread = if options.break_on_write {
            let (space, stop, sender) = (
                Arc::clone(&space),
                Arc::clone(&stop_faults),
                conn.try_clone()?,
            );
            Some(
                std::thread::Builder::new()
                    .name("pagefold-breaks".into())
                    .spawn(move || fault_loop(&space, &stop, &sender))
                    .map_err(os("spawn the fault thread"))?,
            )
        } else {
            None
        };
        let thread_space = Arc::clone(&space);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let remap_thread = std::thread::Builder::new()
            .name("pagefold-remap".into())
            .spawn(move || remap_loop(&thread_space, conn, &ready_tx))
            .map_err(os("spawn the remap thread"));
        let remap_thread = match remap_thread {
            Ok(t) => t,
            Err(e) => {
                stop_faults.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        let client = ServiceClient {
            space,
            vm_id: welcome.vm_id,
            sender,
            remap_thread: Some(remap_thread),
            fault_thread,
            stop_faults,
        };
        if second_mapper {
            // Told every merged run before it may touch the memory.
            let told = ready_rx.recv_timeout(std::time::Duration::from_secs(60));
            if told != Ok(true) {
                return Err(ServiceError::Closed);
            }
        }
        Ok(client)
    }

    /// The id the service gave this VM.
    pub fn vm_id(&self) -> u64 {
        self.vm_id
    }

    /// The guest memory (`None` in a second mapper).
    pub fn memory(&self) -> Option<&Arc<GuestMemory>> {
        self.space.mem.as_ref()
    }

    /// The read-only descriptor of this VM's merge domain's shared frames
    /// that merged pages map (private).
    pub fn shared_frames_fd(&self) -> BorrowedFd<'_> {
        self.space.shared_fd.as_fd()
    }

    /// Whether the service is still there.
    pub fn connected(&self) -> bool {
        self.space.connected.load(Ordering::SeqCst)
    }

    /// Pages of this process mapping a shared frame or zeros now.
    pub fn pages_remapped(&self) -> u64 {
        lock(&self.space.remapped)
            .iter()
            .map(|r| r.iter().filter(|m| **m).count() as u64)
            .sum()
    }

    /// Leaves the service: it brings every merged page home into the
    /// memfd (through the remap thread) and says goodbye. Without a
    /// service (it died), every merged page is brought home here. Returns
    /// the guest memory (`None` in a second mapper).
    pub fn detach(mut self) -> Result<Option<Arc<GuestMemory>>, ServiceError> {
        self.leave();
        let homed = self.space.home_everything();
        self.stop_fault_thread();
        // Memory with pages still away from their own frames stays claimed:
        // a dedup host would take them for plain private pages.
        if let (Some(mem), Ok(())) = (&self.space.mem, &homed) {
            mem.release_from_dedup();
        }
        homed.map_err(|errno| ServiceError::Os {
            op: "bring merged pages home into the guest memfd",
            source: std::io::Error::from_raw_os_error(errno),
        })?;
        Ok(self.space.mem.clone())
    }

    /// After the service was lost: brings every merged page home into the
    /// memfd (so a new service reads true bytes there) and attaches the
    /// memory to the service at `socket` again.
    pub fn reattach(
        self,
        socket: &Path,
        options: ClientOptions,
    ) -> Result<ServiceClient, ServiceError> {
        match self.detach()? {
            Some(mem) => ServiceClient::attach(socket, mem, options),
            None => Err(ServiceError::BadMemory {
                what: "a second mapper attaches again with attach_second_mapper".into(),
            }),
        }
    }

    fn join_remap(&mut self) {
        if let Some(t) = self.remap_thread.take() {
            let _ = t.join();
        }
    }

    /// Says goodbye: the service brings every page home and answers; should
    /// it not within a minute (a stopped or wedged service: found by
    /// review, a detach waited for ever), the connection is closed and what
    /// is left comes home here.
    fn leave(&mut self) {
        if self.connected() && self.sender.send(&Message::Bye, &[]).is_ok() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while self.connected() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        self.shutdown_remap();
    }

    fn shutdown_remap(&mut self) {
        let _ = self.sender.stream().shutdown(std::net::Shutdown::Both);
        self.join_remap();
    }

    fn stop_fault_thread(&mut self) {
        self.stop_faults.store(true, Ordering::SeqCst);
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServiceClient {
    fn drop(&mut self) {
        // As `detach`, as far as it goes (found by review: a client dropped
        // without a goodbye left the service to free frames it still mapped):
        // the service brings every page home and says goodbye; should it not
        // within a minute, this process brings home what is left itself.
        self.leave();
        let homed = self.space.home_everything();
        self.stop_fault_thread();
        if let (Some(mem), Ok(())) = (&self.space.mem, homed) {
            mem.release_from_dedup();
        }
    }
}

/// Serves the service's requests until it says goodbye or goes away.
fn remap_loop(space: &AddressSpace, mut conn: Conn, ready: &std::sync::mpsc::Sender<bool>) {
    loop {
        let reply = match conn.recv() {
            Ok(Some((Message::Ready, _))) => {
                let _ = ready.send(true);
                continue;
            }
            Ok(Some((Message::Remap(m), _))) => {
                let status = if space.control.advance(m.seq, Window::Armed, Window::Taken) {
                    let r = space.remap(m.region, &m.runs);
                    // Done only when done: a failed remap leaves the window
                    // taken, which a service past its deadline reads as a
                    // lost process, never as success (found by review).
                    if r.is_ok() {
                        space.control.advance(m.seq, Window::Taken, Window::Done);
                    }
                    r
                } else {
                    Ok(AckStatus::Skipped)
                };
                ack(m.seq, status)
            }
            Ok(Some((Message::Restore(m), _))) => ack(
                m.seq,
                space
                    .home(m.region, &m.runs, true)
                    .map(|()| AckStatus::Done),
            ),
            Ok(Some((Message::Home(m), _))) => ack(
                m.seq,
                space
                    .home(m.region, &m.runs, false)
                    .map(|()| AckStatus::Done),
            ),
            Ok(Some(_)) | Ok(None) | Err(_) => break,
        };
        if conn.send(&Message::Ack(reply), &[]).is_err() {
            break;
        }
    }
    space.connected.store(false, Ordering::SeqCst);
    let _ = ready.send(false);
    if space.break_on_write {
        // Merged pages are write-protected for good in this mode: with no
        // service to break them, every process brings them home itself.
        let _ = space.home_everything();
    }
    space.release_everything();
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

/// Break-on-write mode: reads the write faults of this process's guest
/// memory and asks the service to break each (the service wakes the
/// writer); reading also lets every `mremap` of a registered range go on.
fn fault_loop(space: &AddressSpace, stop: &AtomicBool, sender: &Conn) {
    while !stop.load(Ordering::SeqCst) {
        if !space.uffd.wait(100).unwrap_or(false) {
            continue;
        }
        while let Ok(Some(fault)) = space.uffd.read_fault() {
            if !fault.write_protect || !space.connected.load(Ordering::SeqCst) {
                continue;
            }
            if let Some((region, page)) = space.page_of(fault.addr) {
                let _ = sender.send(&Message::Break(Break { region, page }), &[]);
            }
        }
    }
}
